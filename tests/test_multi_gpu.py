"""device_map on CUDA: the tiny Llama spread over two GPUs by an explicit map (layer 0 on GPU 0,
layer 1 on GPU 1), against the same model on one GPU. Skipped without CUDA; the two-GPU tests
are skipped with fewer than two GPUs. Not yet run: the development machines have no GPU and the
device machines lent so far had one.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine.engine import Engine, EngineConfig
from engine.loader import load_model
from engine.request import GenerationRequest, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")

SPREAD = {
    "model.embed_tokens": 0,
    "model.rotary_emb": 0,
    "model.layers.0": 0,
    "model.layers.1": 1,
    "model.norm": 1,
    "lm_head": 1,
}
TEXTS = ["Hello there", "The quick brown fox", "Numbers 1 2 3 4", "Café au lait"]
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def greedy_tokens(engine) -> list[list[int]]:
    async def go():
        async def one(i, text):
            ids = engine.render_prompt([{"role": "user", "content": text}])
            return [t async for ev in engine.generate(GenerationRequest(f"r{i}", ids, GREEDY)) for t in ev.token_ids]

        return await asyncio.gather(*[one(i, t) for i, t in enumerate(TEXTS)])

    return asyncio.run(go())


def engine_on(model_dir, device_map=None, **config) -> Engine:
    loaded = load_model(str(model_dir), device="cuda", dtype="float32", device_map=device_map)
    return Engine(loaded, EngineConfig(max_running=8, prefill_chunk=6, **config)).start()


def test_device_map_auto_on_the_first_gpu_keeps_cuda_graphs(tiny_model_dir):
    # a tiny model fits GPU 0 whole: accelerate puts it there, and nothing changes but the loading
    engine = engine_on(tiny_model_dir, "auto")
    try:
        assert engine.loaded.device == "cuda:0" and engine.loaded.layer_devices == ["cuda:0", "cuda:0"]
        assert engine.packed and engine.graphs is not None
        assert all(len(t) == GREEDY.max_tokens for t in greedy_tokens(engine))
    finally:
        engine.stop()


@two_gpus
def test_a_model_over_two_gpus_gives_the_tokens_of_one_gpu(tiny_model_dir):
    one = engine_on(tiny_model_dir)
    try:
        want = greedy_tokens(one)
    finally:
        one.stop()
    spread = engine_on(tiny_model_dir, SPREAD)
    try:
        assert spread.loaded.device == "cuda:0"
        assert spread.loaded.layer_devices == ["cuda:0", "cuda:1"]
        assert spread.packed  # the paged self-test passed across the two devices
        assert spread.graphs is None  # CUDA graphs off: the model spans two devices
        assert [k.device for k in spread.pool.keys] == [torch.device("cuda", 0), torch.device("cuda", 1)]
        assert greedy_tokens(spread) == want  # prompts chunked beside decode rows, the kernel on both GPUs
    finally:
        spread.stop()
