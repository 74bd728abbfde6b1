"""The engine in its own process (engine_process: true; engine/remote.py, engine/core_process.py),
seen over HTTP: the same replies as the in-process engine, aborts, limits, /health and /metrics,
the core dying, and SIGTERM draining then leaving no child behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import jsonschema
import psutil
import pytest
from conftest import make_engine, serve_engine
from test_api import CHAT, _sse_chunks, achat, astream_events, concurrently, stream_text
from test_ops import ROOT, _free_port, scrape
from tiny_models import build_tiny_llama

# bounded: whatever the random model picks, the output is complete within max_tokens
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "label": {"type": "string", "maxLength": 6},
    },
    "required": ["color", "ok", "label"],
    "additionalProperties": False,
}
RF_SCHEMA = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
PROMPTS = [
    "Hello! Tell me about Paris.",
    "The quick brown fox",
    "Numbers 0 1 2 3 and punctuation",
    "Café, naïve, résumé",
    "def add(a, b):",
    "日本語のテキスト",
    "How can I help you today?",
    '{"name": "get_weather"',
]


def launch_remote(model_dir, **config):
    from engine.engine import EngineConfig
    from engine.remote import RemoteEngine, load_model_in_core

    loaded = load_model_in_core(str(model_dir), device="cpu", dtype="float32", torch_threads=1)
    return RemoteEngine(loaded, EngineConfig(**config)).start()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-4k"), max_position_embeddings=4096)


@pytest.fixture(scope="module")
def remote(model_dir):
    engine = launch_remote(model_dir, max_running=8, max_waiting=8)
    with serve_engine(engine) as srv:
        yield engine, srv
    engine.stop()


@pytest.fixture(scope="module")
def local_server(model_dir):
    """The same model, in process (the baseline)."""
    engine = make_engine(model_dir)
    with serve_engine(engine) as srv:
        yield srv
    engine.stop()


def _wait_for(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _replies(base_url: str) -> list:
    """Each prompt twice at once, streamed and not: 16 concurrent greedy requests with logprobs."""

    def jobs(c):
        out = []
        for p in PROMPTS:
            body = dict(
                messages=[{"role": "user", "content": p}], max_tokens=12, temperature=0, logprobs=True, top_logprobs=2
            )
            out += [achat(c, **body), astream_events(c, **body)]
        return out

    results = concurrently(base_url, jobs)
    replies = []
    for i in range(0, len(results), 2):
        whole, chunks = results[i]["choices"][0], results[i + 1]
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        lps = [
            e
            for c in chunks
            if c["choices"] and c["choices"][0].get("logprobs")
            for e in c["choices"][0]["logprobs"]["content"]
        ]
        replies.append(
            dict(
                text=whole["message"]["content"],
                finish=whole["finish_reason"],
                tokens=[
                    (e["token"], round(e["logprob"], 3), [t["token"] for t in e["top_logprobs"]])
                    for e in whole["logprobs"]["content"]
                ],
                stream_text=stream_text(chunks),
                stream_finish=finish,
                stream_tokens=[e["token"] for e in lps],
            )
        )
    return replies


def test_replies_equal_the_in_process_engine(remote, local_server):
    engine, srv = remote
    here, there = _replies(local_server.base_url), _replies(srv.base_url)
    assert there == here
    assert all(r["stream_text"] == r["text"] and r["stream_finish"] == [r["finish"]] for r in there)
    assert sum(len(r["tokens"]) for r in there) > 3 * len(PROMPTS)  # real text came through, not empties


def test_json_schema_constraint_crosses_to_the_core(remote, local_server):
    engine, srv = remote
    body = dict(messages=[{"role": "user", "content": "a thing"}], response_format=RF_SCHEMA, max_tokens=120)

    def jobs(c):
        return [
            achat(c, temperature=0, **body),
            achat(c, temperature=1, seed=3, **body),
            astream_events(c, temperature=0, **body),
        ]

    greedy, seeded, chunks = concurrently(srv.base_url, jobs)
    texts = [
        greedy["choices"][0]["message"]["content"],
        seeded["choices"][0]["message"]["content"],
        stream_text(chunks),
    ]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert texts[2] == texts[0]
    here = concurrently(local_server.base_url, jobs)
    assert [here[0]["choices"][0]["message"]["content"], here[1]["choices"][0]["message"]["content"]] == texts[:2]


def test_a_client_hanging_up_frees_its_row(remote):
    engine, srv = remote
    before = engine.stats.get("finished_abort", 0)
    body = dict(messages=[{"role": "user", "content": "go on"}], max_tokens=3000, ignore_eos=True, stream=True)
    with httpx.Client(base_url=srv.base_url, timeout=60) as c:
        with c.stream("POST", CHAT, json=body) as r:
            lines = r.iter_lines()
            seen = sum(1 for _, line in zip(range(4), lines) if line.startswith("data: {"))
            assert seen >= 2
            assert c.get("/health").json()["running"] == 1
        assert _wait_for(lambda: c.get("/health").json()["running"] == 0)
        health = c.get("/health").json()
    assert health["status"] == "ok" and health["waiting"] == 0
    assert _wait_for(lambda: engine.stats.get("finished_abort", 0) == before + 1)
    assert engine.stats["kv_blocks_used"] == 0


def test_health_and_metrics_show_the_core(remote):
    engine, srv = remote
    with httpx.Client(base_url=srv.base_url, timeout=60) as c:
        r = c.post(CHAT, json=dict(messages=[{"role": "user", "content": "hi"}], max_tokens=5, ignore_eos=True))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        assert _wait_for(lambda: c.get("/health").json()["stats"].get("kv_blocks_used") == 0)
        health = c.get("/health").json()
        metrics = scrape(c)
        assert c.get("/ready").status_code == 200
    stats, name = health["stats"], health["model"]
    assert health["status"] == "ok" and health["running"] == 0 and health["waiting"] == 0
    assert stats["kv_blocks_total"] > 0 and stats["finished_length"] >= 1 and stats["decode_steps"] >= 4
    assert metrics[("chatserve_kv_cache_blocks_free", (("model", name),))] == stats["kv_blocks_free"]
    assert metrics[("chatserve_num_requests_running", (("model", name),))] == 0
    assert engine.core_pid != os.getpid() and psutil.Process(engine.core_pid).ppid() == os.getpid()


def test_a_burst_past_the_limits_gets_429(remote):
    engine, srv = remote
    body = dict(messages=[{"role": "user", "content": "burst"}], max_tokens=300, ignore_eos=True)
    results = concurrently(srv.base_url, lambda c: [c.post(CHAT, json=body) for _ in range(20)])
    codes = sorted(r.status_code for r in results)
    assert codes == [200] * 16 + [429] * 4  # max_running 8 + max_waiting 8
    assert all(r.json()["usage"]["completion_tokens"] == 300 for r in results if r.status_code == 200)
    assert all(r.json()["error"]["code"] == "server_overloaded" for r in results if r.status_code == 429)


def test_the_core_dying_ends_open_requests_and_refuses_new_ones(model_dir):
    engine = launch_remote(model_dir)
    try:
        with serve_engine(engine) as srv, httpx.Client(base_url=srv.base_url, timeout=60) as c:
            body = dict(messages=[{"role": "user", "content": "go"}], max_tokens=3000, ignore_eos=True, stream=True)
            with c.stream("POST", CHAT, json=body) as r:
                lines = []
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                    if len(lines) == 3 and line:
                        os.kill(engine.core_pid, signal.SIGKILL)
            payloads = [json.loads(line[6:]) for line in lines[:-1]]
            assert lines[-1] == "data: [DONE]"
            assert "engine core process exited" in payloads[-1]["error"]["message"]
            assert _wait_for(lambda: not engine.alive, 10)
            refused = c.post(CHAT, json=dict(messages=[{"role": "user", "content": "hi"}], max_tokens=2))
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
            assert c.get("/ready").status_code == 503
            assert c.get("/health").status_code == 503
    finally:
        engine.stop()
    assert not engine.core.process.is_alive()


def test_sigterm_drains_then_no_engine_process_is_left(tmp_path):
    folder = build_tiny_llama(tmp_path / "long", max_position_embeddings=4096)
    port = _free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(folder), "--device", "cpu"]
    cmd += ["--port", str(port), "--drain-timeout", "60", "--engine-process", "--log-format", "json"]
    log = tmp_path / "server.log"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        assert _wait_for(lambda: proc.poll() is not None or _ready(base), 120) and proc.poll() is None
        children = psutil.Process(proc.pid).children()
        # the core has torch and the model loaded (compile workers, the other children, do not)
        assert any(ch.memory_info().rss > 200 * 2**20 for ch in children)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 600, "ignore_eos": True, "stream": True}
        lines = []
        with httpx.Client(timeout=120) as c, c.stream("POST", base + CHAT, json=body) as r:
            it = r.iter_lines()
            lines.append(next(line for line in it if line.startswith("data: {")))
            proc.send_signal(signal.SIGTERM)
            assert _wait_for(lambda: httpx.get(base + "/ready", timeout=10).status_code == 503)
            refused = httpx.post(base + CHAT, json={"messages": [{"role": "user", "content": "x"}]}, timeout=10)
            lines += [line for line in it if line]
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        chunks = _sse_chunks(lines)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == 0
        # an exiting process with torch loaded takes a moment to be torn down after the server exits
        _, left = psutil.wait_procs(children, timeout=20)
        assert not [ch.pid for ch in left if ch.is_running() and ch.status() != psutil.STATUS_ZOMBIE]
        assert "did not stop" not in log.read_text()  # the core stopped when asked, no kill
        # the core logs in the server's format: --log-format json reaches the child
        records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        assert any(r["logger"] == "chatserve.engine" and "engine loop started" in r["message"] for r in records)
        assert "[engine core]" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _ready(base: str) -> bool:
    try:
        return httpx.get(base + "/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
