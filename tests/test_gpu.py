"""The engine and server on a CUDA device (skipped without one; CI has none).

Tiny random-weight models, so they run anywhere CUDA does: the paged step's self-test on CUDA
in float32 and bfloat16, batch invariance, equality with model.generate, the prefix cache,
preemption when the KV pool is full, and one HTTP round trip with the engine on the GPU.
"""
from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from engine.request import GenerationRequest, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def cuda_engine(model_dir, dtype="float32", **config):
    from engine.engine import Engine, EngineConfig
    from engine.loader import load_model
    return Engine(load_model(str(model_dir), device="cuda", dtype=dtype), EngineConfig(**config)).start()


async def collect(engine, ids, params, rid="r"):
    return [ev async for ev in engine.generate(GenerationRequest(rid, ids, params))]


def tokens(events):
    return [t for e in events for t in e.token_ids]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = cuda_engine(tiny_model_dir)
    yield eng
    eng.stop()


def test_packed_steps_pass_their_self_test_on_cuda(engine, tiny_model_dir):
    assert engine.packed is True
    assert str(engine.model.device).startswith("cuda")
    half = cuda_engine(tiny_model_dir, dtype="bfloat16")
    try:
        assert half.packed is True
        events = asyncio.run(collect(half, half.render_prompt([{"role": "user", "content": "Hello"}]),
                                     SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)))
        assert len(tokens(events)) == 8
    finally:
        half.stop()


def test_greedy_alone_equals_inside_a_batch_of_16_on_cuda(engine):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    target = engine.render_prompt([{"role": "user", "content": "Tell me about emoji 😀🎉"}])
    alone = tokens(asyncio.run(collect(engine, target, greedy)))

    async def batch():
        jobs = [collect(engine, target, greedy, "t")]
        for i in range(15):
            p = SamplingParams(temperature=[0, 0.7, 1.3][i % 3], seed=i, max_tokens=5 + 3 * i)
            ids = engine.render_prompt([{"role": "user", "content": "Numbers 1 2 3 " * (1 + i % 4)}])
            jobs.append(collect(engine, ids, p, f"o{i}"))
        return await asyncio.gather(*jobs)

    assert tokens(asyncio.run(batch())[0]) == alone


def test_engine_tokens_equal_model_generate_on_cuda(engine):
    ids = engine.render_prompt([{"role": "user", "content": "The quick brown fox"}])
    got = tokens(asyncio.run(collect(engine, ids, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))))
    with torch.inference_mode():
        ref = engine.model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=16, min_new_tokens=16,
                                    do_sample=False)
    assert got == ref[0, len(ids):].tolist()


def test_prefix_cache_on_cuda_gives_the_same_tokens(engine):
    system = {"role": "system", "content": "You answer in short sentences about the weather. " * 4}
    ids = engine.render_prompt([system, {"role": "user", "content": "Rain?"}])
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    first = asyncio.run(collect(engine, ids, params))
    again = asyncio.run(collect(engine, ids, params))
    assert tokens(first) == tokens(again)
    assert again[-1].cached_tokens >= 16


def test_http_round_trip_with_the_engine_on_cuda(engine):
    from conftest import serve_engine
    with serve_engine(engine) as srv:
        r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6,
                             "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == 6


def test_a_full_pool_preempts_and_recovers_on_cuda(tiny_model_dir, engine):
    small = cuda_engine(tiny_model_dir, kv_cache_blocks=13, max_running=8)
    try:
        params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
        prompts = [engine.render_prompt([{"role": "user", "content": f"Numbers {i} " * (1 + i)}]) for i in range(8)]
        alone = [tokens(asyncio.run(collect(engine, ids, params))) for ids in prompts]

        async def together():
            return await asyncio.gather(*[collect(small, ids, params, str(i)) for i, ids in enumerate(prompts)])

        assert [tokens(r) for r in asyncio.run(together())] == alone
        assert small.stats["preemptions"] > 0 and small.stats["kv_blocks_used"] == 0
    finally:
        small.stop()
