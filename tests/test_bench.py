"""``chatserve bench`` against a fake OpenAI-compatible streaming server.

The fake server (FastAPI + uvicorn on a free 127.0.0.1 port, in a thread) picks
its behaviour from the prompt text, so the expected counts are exact:

* plain prompt: 8 content chunks, a usage chunk (completion_tokens=8), [DONE]
* "REJECT": HTTP 429
* "BROKEN": 2 content chunks, then ``data: {"error": ...}``
* "NO-USAGE": 5 content chunks and [DONE], no usage chunk
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `pytest` (not `python -m pytest`) without an installed package
    sys.path.insert(0, str(REPO))

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from fastapi import Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402

from server import bench  # noqa: E402

MODEL = "fake-model"
API_KEY = "sekrit"


def _chunk(delta: dict, finish=None, usage=None) -> str:
    obj = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        obj = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": MODEL, "choices": [], "usage": usage}
    return f"data: {json.dumps(obj)}\n\n"


def make_app(seen: list):
    app = fastapi.FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}, {"id": "other", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append({"body": body, "auth": request.headers.get("authorization")})
        prompt = body["messages"][-1]["content"]
        if "REJECT" in prompt:
            return JSONResponse({"error": {"message": "too many requests", "type": "rate_limit"}}, status_code=429)

        async def events():
            yield _chunk({"role": "assistant", "content": ""})  # role-only chunk: not a content token
            n = 2 if "BROKEN" in prompt else 5 if "NO-USAGE" in prompt else 8
            for i in range(n):
                await asyncio.sleep(0.001)
                yield _chunk({"content": f"tok{i} "})
            if "BROKEN" in prompt:
                yield f"data: {json.dumps({'error': {'message': 'engine exploded', 'code': 500}})}\n\n"
                return
            yield ": keep-alive comment\n\n"
            yield _chunk({}, finish="length")
            if "NO-USAGE" not in prompt:
                yield _chunk({}, usage={"prompt_tokens": 11, "completion_tokens": n, "total_tokens": 11 + n})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake_server():
    seen: list = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(make_app(seen), log_level="warning", lifespan="off", loop="asyncio")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1", seen
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


def test_closed_loop_counts(fake_server):
    base, seen = fake_server
    prompts = ["tell me a story", "REJECT this one", "another story", "BROKEN stream", "NO-USAGE please", "REJECT too"]
    n = 12  # prompts cycle, so each appears exactly twice
    seen.clear()
    s = asyncio.run(
        bench.run_load(
            base,
            MODEL,
            concurrency=4,
            num_requests=n,
            max_tokens=8,
            prompts=prompts,
            api_key=API_KEY,
            ignore_eos=True,
            warmup=1,
        )
    )
    assert len(seen) == n + 1  # + the warmup
    assert s["num_requests"] == n
    assert s["ok"] == 6  # 2x plain, 2x plain, 2x no-usage
    assert s["failed"] == 6
    assert s["rate_limited"] == 4
    assert s["failed_by_status"] == {"429": 4, "stream_error": 2}
    assert any("engine exploded" in e for e in s["errors"])
    assert any("too many requests" in e for e in s["errors"])
    # usage chunk counts where sent, else content chunks
    assert s["total_output_tokens"] == 4 * 8 + 2 * 5
    assert s["usage_missing"] == 2
    assert s["total_prompt_tokens"] == 4 * 11
    assert s["ttft_ms"]["n"] == 6 and s["e2e_ms"]["n"] == 6
    assert s["itl_ms"]["n"] == 4 * 7 + 2 * 4
    for r in s["requests"]:
        if r["ok"]:
            assert 0 <= r["ttft_s"] <= r["e2e_s"]
            assert r["finish_reason"] == "length"
        else:
            assert r["error_kind"] in ("429", "stream_error")
            assert r["status"] in (429, 200)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        st = s[key]
        assert st["p50"] <= st["p90"] <= st["p99"] <= st["max"]
    assert s["ttft_ms"]["p50"] <= s["e2e_ms"]["p50"]
    assert s["output_throughput"] > 0 and s["request_throughput"] > 0

    # what went over the wire
    body = seen[-1]["body"]
    assert seen[-1]["auth"] == f"Bearer {API_KEY}"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["min_tokens"] == 8 and body["max_tokens"] == 8
    assert body["model"] == MODEL and body["temperature"] == 0.0


def test_open_loop_with_cap(fake_server):
    base, _ = fake_server
    s = asyncio.run(
        bench.run_load(base, MODEL, concurrency=2, num_requests=6, max_tokens=8, prompts=["hi"], request_rate=1000.0)
    )
    assert s["mode"] == "open" and s["request_rate"] == 1000.0 and s["concurrency"] == 2
    assert s["ok"] == 6 and s["failed"] == 0
    assert s["total_output_tokens"] == 48
    starts = [r["start_s"] for r in s["requests"]]
    assert all(r["scheduled_s"] <= r["start_s"] for r in s["requests"])
    assert len(starts) == 6


def test_unreachable_server_counts_failures():
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]  # nothing listens once closed
    s = asyncio.run(bench.run_load(f"http://127.0.0.1:{port}/v1", MODEL, 2, 3, 8, ["hi"], timeout=5))
    assert s["ok"] == 0 and s["failed"] == 3
    assert s["failed_by_status"] == {"ConnectError": 3}
    assert s["output_throughput"] == 0


def test_cli_writes_json_and_png(fake_server, tmp_path, monkeypatch, capsys):
    base, seen = fake_server
    monkeypatch.setenv("CHATSERVE_API_KEY", API_KEY)
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text('"a story"\n{"prompt": "REJECT me"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    out = tmp_path / "out" / "res.json"
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        [
            "--base-url",
            base,
            "--concurrency",
            "1,3",
            "--num-requests",
            "6",
            "--max-tokens",
            "8",
            "--prompt-file",
            str(prompt_file),
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    seen.clear()
    assert bench.run(args) == 0
    printed = capsys.readouterr().out
    png = out.with_suffix(".png")
    assert out.is_file() and png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in printed and str(png) in printed
    assert "TTFT" in printed and "c=3" in printed

    doc = json.loads(out.read_text())
    assert doc["model"] == MODEL  # found through GET /models
    assert doc["args"]["concurrency"] == [1, 3] and "timestamp" in doc
    assert [r["concurrency"] for r in doc["runs"]] == [1, 3]
    for r in doc["runs"]:
        assert r["ok"] == 4 and r["rate_limited"] == 2
        assert r["total_output_tokens"] == 32
    assert all(x["auth"] == f"Bearer {API_KEY}" for x in seen)
    assert len(seen) == 1 + 6 + 6  # warmup once, then two runs


def test_request_rate_rejects_concurrency_list(fake_server, tmp_path, capsys):
    base, _ = fake_server
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        ["--base-url", base, "--request-rate", "5", "--concurrency", "1,2", "--output", str(tmp_path / "x.json")]
    )
    assert bench.run(args) == 2
    assert not (tmp_path / "x.json").exists()


def test_percentile_matches_linear_interpolation():
    assert bench.percentile([], 50) is None
    assert bench.percentile([3.0], 99) == 3.0
    assert bench.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert bench.percentile([0.0, 10.0], 90) == pytest.approx(9.0)


def test_no_torch_or_engine_import():
    code = (
        "import sys, server.bench; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'engine'))]; "
        "print(bad); sys.exit(bool(bad))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
