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

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


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
        events = asyncio.run(
            collect(
                half,
                half.render_prompt([{"role": "user", "content": "Hello"}]),
                SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
            )
        )
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
        ref = engine.model.generate(
            torch.tensor([ids], device="cuda"), max_new_tokens=16, min_new_tokens=16, do_sample=False
        )
    assert got == ref[0, len(ids) :].tolist()


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
        r = httpx.post(
            srv.base_url + "/v1/chat/completions",
            timeout=60,
            json={
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 6,
                "temperature": 0,
                "ignore_eos": True,
            },
        )
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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_replay_equals_eager_token_for_token(tiny_model_dir, dtype):
    """Decode steps replayed from CUDA graphs give the tokens eager steps give. Batches of 1, 2 and
    4 rows that stay together (same max_tokens): the graph's bucket equals the eager batch, so even
    bfloat16 rounding is the same."""
    eager = cuda_engine(tiny_model_dir, dtype=dtype, enforce_eager=True, max_running=8)
    graphs = cuda_engine(tiny_model_dir, dtype=dtype, max_running=8)
    try:
        assert eager.graphs is None
        assert graphs.graphs is not None and sorted(graphs.graphs.graphs) == [1, 2, 4, 8]
        params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        texts = ["Hello there", "The quick brown fox", "Numbers 1 2 3 4", "Café au lait"]

        def run(engine, n):
            async def go():
                return await asyncio.gather(
                    *[
                        collect(engine, engine.render_prompt([{"role": "user", "content": t}]), params, f"r{i}")
                        for i, t in enumerate(texts[:n])
                    ]
                )

            return [tokens(r) for r in asyncio.run(go())]

        for n in (1, 2, 4):
            assert run(graphs, n) == run(eager, n)
        assert graphs.stats["graph_steps"] >= 3 * 19 and eager.stats["graph_steps"] == 0
    finally:
        eager.stop()
        graphs.stop()


def test_compiled_layers_in_cuda_graphs_give_the_eager_tokens(tiny_model_dir):
    """--compile: inductor's Triton kernels for the decoder layers, captured in the decode graphs,
    with the paged kernel between them; float32, a batch of 4 that stays together: same tokens as the
    uncompiled engine, and nothing compiles after start-up."""
    import torch._dynamo.utils

    plain = cuda_engine(tiny_model_dir, max_running=4)
    fused = cuda_engine(tiny_model_dir, max_running=4, compile=True)
    try:
        assert fused.graphs is not None and fused.model.get_decoder().layers[0]._compiled_call_impl is not None
        compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        texts = ["Hello there", "The quick brown fox", "Numbers 1 2 3 4", "Café au lait"]

        def run(engine):
            async def go():
                return await asyncio.gather(
                    *[
                        collect(engine, engine.render_prompt([{"role": "user", "content": t}]), params, f"r{i}")
                        for i, t in enumerate(texts)
                    ]
                )

            return [tokens(r) for r in asyncio.run(go())]

        assert run(fused) == run(plain)
        assert fused.stats["graph_steps"] >= 19
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled
    finally:
        plain.stop()
        fused.stop()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_paged_kernel_equals_gathered_sdpa_on_cuda(dtype):
    from engine.triton_attention import paged_decode

    torch.manual_seed(0)
    bs, blocks, kv_heads, q_heads, dim = 16, 700, 8, 32, 128
    K = torch.randn(blocks * bs, kv_heads, dim, device="cuda", dtype=dtype)
    V = torch.randn_like(K)
    lens = [1, 200, 5000, 8000 // 3, 37]
    perm = (torch.randperm(blocks - 1) + 1).tolist()
    tables, at = [], 0
    for n in lens:
        tables.append(perm[at : at + -(-n // bs)])
        at += len(tables[-1])
    width = max(map(len, tables))
    tables_t = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device="cuda")
    q = torch.randn(len(lens), q_heads, dim, device="cuda", dtype=dtype)
    got = paged_decode(q, K, V, tables_t, torch.tensor(lens, dtype=torch.int32, device="cuda"), bs, dim**-0.5)
    for b, n in enumerate(lens):
        pos = torch.arange(n, device="cuda")
        slots = torch.tensor(tables[b], device="cuda")[pos // bs] * bs + pos % bs
        k = K[slots].transpose(0, 1).unsqueeze(0)
        v = V[slots].transpose(0, 1).unsqueeze(0)
        ref = torch.nn.functional.scaled_dot_product_attention(q[b][None, :, None], k, v, enable_gqa=True)[0, :, 0]
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got[b].float(), ref.float(), rtol=tol, atol=tol)
