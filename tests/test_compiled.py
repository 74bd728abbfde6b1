"""``compile=True`` (--compile): the decoder layers run through torch.compile (inductor's C++
backend here, Triton on CUDA) with the paged KV write and attention left eager. Same tokens as the
eager engine, and the start-up warm-up leaves nothing to compile while requests are served."""

from __future__ import annotations

import asyncio

from conftest import make_engine
from test_engine import PROMPTS, collect, prompt_ids, result

from engine.request import SamplingParams


def test_compiled_layers_give_the_eager_tokens_and_compile_nothing_while_serving(tiny_model_dir):
    import torch._dynamo.utils

    # 9 requests of different lengths in a batch of at most 4: mixed steps of several sizes, decode
    # buckets 4, 2 and 1 (graph buffers emulated on CPU), greedy and seeded sampling
    cases = [
        (
            PROMPTS[i % len(PROMPTS)] * (1 + i % 3),
            SamplingParams(temperature=0 if i % 2 else 0.8, seed=i, max_tokens=3 + 2 * i, ignore_eos=True),
        )
        for i in range(9)
    ]

    def run(engine):
        async def go():
            return await asyncio.gather(
                *[collect(engine, prompt_ids(engine, t), p, f"r{i}") for i, (t, p) in enumerate(cases)]
            )

        return [result(r) for r in asyncio.run(go())]

    eager = make_engine(tiny_model_dir, decode_graphs="emulate", max_running=4)
    try:
        expected = run(eager)
    finally:
        eager.stop()
    engine = make_engine(tiny_model_dir, decode_graphs="emulate", max_running=4, compile=True)
    try:
        assert engine.model.get_decoder().layers[0]._compiled_call_impl is not None
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert graphs > 0  # compiled at start-up
        assert run(engine) == expected
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing new while serving
        assert engine.stats["graph_steps"] > 0
    finally:
        engine.stop()
