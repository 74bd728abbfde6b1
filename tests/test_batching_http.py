"""Continuous batching seen from HTTP: many concurrent streams, disconnects, admission limits."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from conftest import make_engine, serve_engine

MSG = [{"role": "user", "content": "Tell me a story"}]


def _payload(max_tokens, stream=True, **kw):
    return {
        "messages": MSG,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
        **kw,
    }


async def _stream(client, max_tokens, stop_after=None):
    """Read a stream; with stop_after, hang up after that many content chunks."""
    chunks = 0
    usage = None
    async with client.stream("POST", "/v1/chat/completions", json=_payload(max_tokens)) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d["choices"] and d["choices"][0]["delta"].get("content"):
                chunks += 1
                if stop_after is not None and chunks >= stop_after:
                    return ("hung up", chunks)
            if d.get("usage"):
                usage = d["usage"]
    return ("done", usage["completion_tokens"])


@pytest.fixture(scope="module")
def engine32(tiny_model_dir):
    eng = make_engine(tiny_model_dir, max_running=32, max_waiting=64)
    yield eng
    eng.stop()


def test_32_streams_complete_and_10_disconnects_free_their_rows(engine32):
    with serve_engine(engine32) as srv:

        async def scenario():
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=120, limits=limits) as client:
                jobs = [_stream(client, 120, stop_after=3 if i < 10 else None) for i in range(32)]
                return await asyncio.gather(*jobs)

        before = engine32.stats["finished_abort"]
        results = asyncio.run(scenario())
    assert sorted(r[0] for r in results) == ["done"] * 22 + ["hung up"] * 10
    assert all(r[1] == 120 for r in results if r[0] == "done")
    assert engine32.stats["finished_abort"] - before == 10  # the 10 rows were aborted, not run to the end
    deadline = time.monotonic() + 10
    while engine32.num_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine32.num_running == 0


def test_overload_burst_gets_429_with_retry_after(tiny_model_dir):
    small = make_engine(tiny_model_dir, max_running=2, max_waiting=2)
    try:
        with serve_engine(small) as srv:

            async def burst():
                async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as client:
                    return await asyncio.gather(
                        *[client.post("/v1/chat/completions", json=_payload(200, stream=False)) for _ in range(10)]
                    )

            responses = asyncio.run(burst())
    finally:
        small.stop()
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 4 + [429] * 6
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "server_overloaded"
        else:
            assert r.json()["usage"]["completion_tokens"] == 200
