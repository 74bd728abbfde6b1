"""The CUDA paged decode kernel (engine/triton_attention.py), run in Triton's CPU interpreter.

It is checked against attention written out by hand over the same pool (random block tables, GQA,
contexts shorter and longer than a split, sliding windows), and inside the engine: greedy tokens
through the kernel (eager mixed steps and static-buffer decode steps, as CUDA graphs run them)
equal the CPU gather path's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Triton picks interpreter or compiler when its modules are first imported, and anything in the
# session may import it earlier (or run with a cleared environment). So the kernel runs in a fresh
# interpreter: this file's tests, run again by pytest in a child process with TRITON_INTERPRET=1.
CHILD = os.environ.get("CHATSERVE_TRITON_CHILD") == "1"
pytest.importorskip("triton")

if not CHILD:

    def test_the_kernel_checks_pass_in_a_fresh_interpreter():
        env = {**os.environ, "TRITON_INTERPRET": "1", "CHATSERVE_TRITON_CHILD": "1"}
        root = Path(__file__).resolve().parent.parent
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        assert "13 passed" in r.stdout, r.stdout[-2000:]

else:
    import asyncio

    import torch
    from conftest import make_engine

    from engine.request import GenerationRequest, SamplingParams

    def reference(q, K, V, tables, lens, block_size, window=None):
        """Each row's attention over its context, positions gathered one by one through its block table."""
        out = []
        group = q.shape[1] // K.shape[1]
        for b, length in enumerate(lens):
            pos = torch.arange(length)
            slots = torch.tensor(tables[b])[pos // block_size] * block_size + pos % block_size
            k = K[slots].repeat_interleave(group, 1)
            v = V[slots].repeat_interleave(group, 1)
            scores = torch.einsum("hd,thd->ht", q[b], k) * q.shape[-1] ** -0.5
            if window:
                scores[:, : max(0, length - window)] = float("-inf")
            out.append(torch.einsum("ht,thd->hd", scores.softmax(-1), v))
        return torch.stack(out)

    @pytest.mark.parametrize("window", [None, 20])
    @pytest.mark.parametrize("splits", [1, 3, 4])
    @pytest.mark.parametrize("dim", [32, 512])  # 512: Gemma 4's full-attention layers
    def test_the_kernel_equals_attention_written_out_over_the_pool(window, splits, dim):
        from engine.triton_attention import paged_decode

        g = torch.Generator().manual_seed(0)
        bs, blocks, kv_heads, q_heads = 16, 40, 2, 8
        K = torch.randn(blocks * bs, kv_heads, dim, generator=g)
        V = torch.randn(blocks * bs, kv_heads, dim, generator=g)
        lens = [1, 17, 100, 33]  # one token, a block and one, several splits
        free = (torch.randperm(blocks - 1, generator=g) + 1).tolist()  # scattered blocks, never block 0
        tables = []
        for n in lens:
            need = -(-n // bs)
            tables.append(free[:need])
            free = free[need:]
        width = max(map(len, tables))
        tables_t = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        q = torch.randn(len(lens), q_heads, dim, generator=g)
        got = paged_decode(q, K, V, tables_t, torch.tensor(lens, dtype=torch.int32), bs, dim**-0.5, window, splits)
        torch.testing.assert_close(got, reference(q, K, V, tables, lens, bs, window), rtol=1e-5, atol=1e-5)

    def test_engine_tokens_through_the_kernel_equal_the_gather_path(tiny_model_dir, monkeypatch):
        """Mixed steps (a prompt chunk beside decoding rows) and decode-only steps on static buffers
        padded to a bucket (the CUDA-graph path, emulated): the same greedy tokens as the gather path."""
        params = [SamplingParams(temperature=0, max_tokens=6 + 3 * i, ignore_eos=True) for i in range(3)]

        def run(engine):
            prompts = [
                engine.render_prompt([{"role": "user", "content": t}])
                for t in ("Hello there", "Numbers 1 2 3 " * 4, "def add(a, b):")
            ]

            async def go():
                async def one(i):
                    return [
                        t
                        async for ev in engine.generate(GenerationRequest(f"r{i}", prompts[i], params[i]))
                        for t in ev.token_ids
                    ]

                return await asyncio.gather(*[one(i) for i in range(3)])

            return asyncio.run(go())

        gather = make_engine(tiny_model_dir, decode_graphs="off", prefill_chunk=8)
        try:
            expected = run(gather)
        finally:
            gather.stop()
        monkeypatch.setenv("CHATSERVE_TRITON_DECODE", "1")
        kernel = make_engine(tiny_model_dir, decode_graphs="emulate", prefill_chunk=8, max_running=4)
        try:
            assert kernel.graphs is not None and kernel.graphs.steps[4].tables is not None  # the kernel path
            assert run(kernel) == expected
            assert kernel.stats["graph_steps"] > 0
        finally:
            kernel.stop()
