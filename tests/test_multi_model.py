"""Several models in one process: each its own engine, routed by the request's `model`; aliases;
/v1/models, /ready, /health and /metrics per model; the CLI's --config (repeated, or a `models:`
list) and its one-line config errors."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import make_engine
from prometheus_client.parser import text_string_to_metric_families
from tiny_models import build_tiny_llama

from server.app import create_app
from server.cli import _serve_parser, build_app, main, resolve_serve_settings
from server.settings import ConfigError, kv_fractions

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory) -> Path:
    """Another tiny Llama (other weights), so the two models really are two."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-beta"), seed=1)


@pytest.fixture(scope="module")
def pair(tiny_model_dir, second_model_dir):
    """alpha (alias a2) and beta, each its own engine, behind one app."""
    from starlette.testclient import TestClient

    alpha, beta = make_engine(tiny_model_dir), make_engine(second_model_dir)
    app = create_app([(["alpha", "a2"], alpha), ("beta", beta)], playground=False)
    with TestClient(app) as c:
        yield alpha, beta, c
    alpha.stop()
    beta.stop()


def finished(engine) -> int:
    return sum(v for k, v in engine.stats.items() if k.startswith("finished_"))


def scrape(c) -> dict:
    out = {}
    for family in text_string_to_metric_families(c.get("/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def error_of(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    return err


# ------------------------------------------------------------------------------------------- routing
@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_each_name_reaches_its_own_engine(pair, path):
    alpha, beta, c = pair
    payload = {"messages": HI} if path == CHAT else {"prompt": "Hello there"}
    for name, engine, other in (("alpha", alpha, beta), ("a2", alpha, beta), ("beta", beta, alpha)):
        mine, theirs = finished(engine), finished(other)
        r = c.post(path, json={**payload, "model": name, "max_tokens": 3, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == name  # the name the request used, alias included
        assert body["usage"]["completion_tokens"] == 3
        assert (finished(engine), finished(other)) == (mine + 1, theirs), name


def test_an_alias_is_the_same_model(pair):
    alpha, beta, c = pair
    texts = {}
    for name in ("alpha", "a2", "beta"):
        r = c.post(
            CHAT,
            json={
                "model": name,
                "messages": HI,
                "max_tokens": 8,
                "temperature": 0,
                "ignore_eos": True,
                "logprobs": True,
            },
        )
        texts[name] = [t["logprob"] for t in r.json()["choices"][0]["logprobs"]["content"]]
    assert texts["alpha"] == texts["a2"]  # same weights, same greedy logprobs
    assert texts["alpha"] != texts["beta"]  # other weights


def test_streams_are_routed_too(pair):
    alpha, beta, c = pair
    before = finished(beta), finished(alpha)
    with c.stream(
        "POST", CHAT, json={"model": "beta", "messages": HI, "max_tokens": 4, "stream": True, "ignore_eos": True}
    ) as r:
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    assert {ch["model"] for ch in chunks} == {"beta"}
    assert (finished(beta), finished(alpha)) == (before[0] + 1, before[1])


def test_models_lists_every_name_and_finds_each(pair, second_model_dir):
    _, _, c = pair
    assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["alpha", "a2", "beta"]
    assert c.get("/v1/models/a2").json()["id"] == "a2"
    # the folder a model was loaded from names it too (it is unambiguous here)
    assert c.get(f"/v1/models/{second_model_dir}").json()["id"] == "beta"
    r = c.post(CHAT, json={"model": str(second_model_dir), "messages": HI, "max_tokens": 1})
    assert r.status_code == 200 and r.json()["model"] == "beta"


def test_an_unknown_model_is_a_404_naming_the_served_ones(pair):
    _, _, c = pair
    for r in (
        c.post(CHAT, json={"model": "gpt-17", "messages": HI}),
        c.post(COMPLETIONS, json={"model": "gpt-17", "prompt": "x"}),
        c.get("/v1/models/gpt-17"),
    ):
        err = error_of(r, 404, "model_not_found")
        assert err["type"] == "invalid_request_error" and err["param"] == "model"
        assert err["message"] == "model 'gpt-17' not found; this server serves 'alpha', 'a2', 'beta'"


def test_with_several_models_the_request_must_say_which(pair):
    _, _, c = pair
    for extra in ({}, {"model": "tgi"}, {"model": ""}):
        err = error_of(c.post(CHAT, json={"messages": HI, **extra}), 400, "model_required")
        assert err["param"] == "model" and "'alpha', 'a2', 'beta'" in err["message"]
    error_of(c.post(COMPLETIONS, json={"prompt": "x"}), 400, "model_required")


def test_ready_and_health_report_every_model(pair):
    alpha, beta, c = pair
    assert c.get("/ready").json() == {"status": "ready", "models": ["alpha", "beta"]}
    h = c.get("/health").json()
    assert h["status"] == "ok" and set(h["models"]) == {"alpha", "beta"}
    assert all(m["status"] == "ok" and m["running"] == 0 for m in h["models"].values())
    assert h["models"]["beta"]["stats"] == {k: v for k, v in beta.stats.items()}
    assert "model" not in h and "stats" not in h  # per model only, with several


def test_metrics_are_per_model(pair):
    alpha, beta, c = pair
    before = scrape(c)
    for name, n in (("alpha", 2), ("beta", 1)):
        for _ in range(n):
            c.post(CHAT, json={"model": name, "messages": HI, "max_tokens": 2, "ignore_eos": True})
    c.post(CHAT, json={"model": "a2", "messages": HI, "max_tokens": 2, "ignore_eos": True})
    c.post(CHAT, json={"model": "nope", "messages": HI})
    after = scrape(c)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    ep = "chat/completions"
    assert moved("chatserve_requests_total", model="alpha", endpoint=ep, status="200") == 3  # a2 is alpha
    assert moved("chatserve_requests_total", model="beta", endpoint=ep, status="200") == 1
    assert moved("chatserve_requests_total", model="", endpoint=ep, status="404") == 1  # no model chosen
    assert moved("chatserve_generation_tokens_total", model="alpha") == 6
    assert moved("chatserve_generation_tokens_total", model="beta") == 2
    for model in ("alpha", "beta"):
        assert ("chatserve_num_requests_waiting", (("model", model),)) in after


def test_one_model_down_is_not_ready_and_says_which(tiny_model_dir, second_model_dir):
    from starlette.testclient import TestClient

    alpha, beta = make_engine(tiny_model_dir), make_engine(second_model_dir)
    try:
        beta.stop()
        with TestClient(create_app({"alpha": alpha, "beta": beta}, playground=False)) as c:
            r = c.get("/ready")
            assert r.status_code == 503
            assert r.json() == {"status": "unavailable", "models": ["alpha", "beta"], "unavailable": ["beta"]}
            h = c.get("/health")
            assert h.status_code == 503 and h.json()["status"] == "unavailable"
            assert h.json()["models"]["beta"]["status"] == "unavailable"
            assert h.json()["models"]["alpha"]["status"] == "ok"
            err = error_of(c.post(CHAT, json={"model": "beta", "messages": HI}), 503, "engine_unavailable")
            assert "'beta'" in err["message"]
            assert c.post(CHAT, json={"model": "alpha", "messages": HI, "max_tokens": 1}).status_code == 200
    finally:
        alpha.stop()


def test_create_app_forms(tiny_engine):
    from starlette.testclient import TestClient

    # one engine under several dict keys: one model, the first key its id, the others aliases
    with TestClient(create_app({"main": tiny_engine, "other-name": tiny_engine}, playground=False)) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["main", "other-name"]
        assert c.get("/ready").json()["models"] == ["main"]
        r = c.post(CHAT, json={"messages": HI, "max_tokens": 1})  # one model: `model` may be left out
        assert r.status_code == 200 and r.json()["model"] == "main"
    with pytest.raises(ValueError, match="'x' is given to two models"):
        create_app([("x", tiny_engine), (["y", "x"], object())])


# ---------------------------------------------------------------------------------------- CLI and configs
def settings_of(argv):
    p = argparse.ArgumentParser()
    _serve_parser(p)
    return resolve_serve_settings(p.parse_args(argv))


def test_configs_combine_per_model_and_server_wide(tmp_path):
    (tmp_path / "a.yaml").write_text("model: /m/a\nserved_model_name: [a, a-alias]\nmax_running: 4\nport: 9000\n")
    (tmp_path / "both.yaml").write_text(
        "device: cpu\nallowed_origins: https://x.example\n"
        "models:\n  - model: /m/b\n    served_model_name: b\n    aliases: bee\n"
        "  - {model: /m/c, served_model_name: c, device: auto}\n"
    )
    s = settings_of(
        ["--config", str(tmp_path / "a.yaml"), "--config", str(tmp_path / "both.yaml"), "--max-waiting", "7"]
    )
    assert [(m["served_model_name"], m["aliases"]) for m in s.models] == [("a", ["a-alias"]), ("b", ["bee"]), ("c", [])]
    assert [m["max_running"] for m in s.models] == [4, 32, 32]  # a.yaml's own
    assert [m["device"] for m in s.models] == ["auto", "cpu", "auto"]  # both.yaml's top level, c overrides it
    assert [m["max_waiting"] for m in s.models] == [7, 7, 7]  # a flag: every model
    assert s.server["port"] == 9000 and s.server["allowed_origins"] == ["https://x.example"]
    assert s.origins[2] == f"{tmp_path / 'both.yaml'}: models[1]"


def run_cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(["serve", *argv])
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "yaml",
        "unknown",
        "unknown-in-item",
        "server-key-in-item",
        "duplicate",
        "duplicate-alias",
        "conflict",
        "type",
        "choice",
        "models-not-list",
        "model-flag",
        "device-map",
        "device-map-device",
        "device-map-type",
    ],
)
def test_config_errors_are_one_line_naming_file_and_key(tmp_path, capsys, case):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("model: /m/a\nserved_model_name: shared\n")
    argv, expect = ["--config", str(a), "--config", str(b)], None
    if case == "missing":
        argv, expect = ["--config", str(tmp_path / "nope.yaml")], f"{tmp_path / 'nope.yaml'}: no such file"
    elif case == "yaml":
        b.write_text("model: /m/b\nserved_model_name: [b\n")
        expect = f"{b}: not valid YAML: line 3, column 1:"
    elif case == "unknown":
        b.write_text("model: /m/b\nmax_runing: 3\n")
        expect = f"{b}: unknown key 'max_runing' (did you mean 'max_running'?)"
    elif case == "unknown-in-item":
        b.write_text("models:\n  - model: /m/b\n  - model: /m/c\n    kv_cache: 1\n")
        expect = f"{b}: models[1]: unknown key 'kv_cache'"
    elif case == "server-key-in-item":
        b.write_text("models:\n  - model: /m/b\n    port: 8001\n")
        expect = f"{b}: models[0]: port: a server-wide setting"
    elif case == "duplicate":
        b.write_text("model: /m/b\nserved_model_name: shared\n")
        expect = f"{b}: served_model_name: 'shared' is also a name of {a}'s model"
    elif case == "duplicate-alias":
        b.write_text("models:\n  - {model: /m/b, served_model_name: b}\n  - {model: /m/c, aliases: [x, shared]}\n")
        expect = f"{b}: models[1]: aliases: 'shared' is also a name of {a}'s model"
    elif case == "conflict":
        a.write_text("model: /m/a\nport: 8000\n")
        b.write_text("model: /m/b\nport: 8001\n")
        expect = f"{b}: port: 8001 conflicts with {a}'s 8000"
    elif case == "type":
        b.write_text("model: /m/b\nmax_running: lots\n")
        expect = f"{b}: max_running: expected an integer, got 'lots'"
    elif case == "choice":
        b.write_text("model: /m/b\ndtype: float8\n")
        expect = f"{b}: dtype: expected one of auto, float32, bfloat16, float16, got 'float8'"
    elif case == "models-not-list":
        b.write_text("models: /m/b\n")
        expect = f"{b}: models: expected a list of models"
    elif case == "model-flag":
        b.write_text("model: /m/b\n")
        argv += ["--model", "/m/c"]
        expect = "--model: names one model, and 2 are configured"
    elif case == "device-map":
        b.write_text("model: /m/b\ndevice_map: everywhere\n")
        expect = f"{b}: device_map: expected one of auto, balanced, sequential or a mapping of module name to device"
    elif case == "device-map-device":
        b.write_text("model: /m/b\ndevice_map:\n  model.layers.0: 0\n  model.layers.1: gpu1\n")
        expect = f"{b}: device_map: 'model.layers.1': expected a GPU number, cuda:N or cpu, got 'gpu1'"
    elif case == "device-map-type":
        b.write_text("models:\n  - model: /m/b\n    device_map: [0, 1]\n")
        expect = f"{b}: models[0]: device_map: expected a string or a mapping, got [0, 1]"
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"chatserve: {expect}"), err


def test_two_models_with_one_derived_name_stop_start_up(tiny_model_dir, tmp_path):
    """Neither model is given a name: both get the folder's, which is an error (found after loading,
    as the loader derives the name) and leaves no engine running."""
    cfg = tmp_path / "same-twice.yaml"
    cfg.write_text(f"device: cpu\ndtype: float32\nmodels:\n  - model: {tiny_model_dir}\n  - model: {tiny_model_dir}\n")
    s = settings_of(["--config", str(cfg)])
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(
        ConfigError,
        match=rf"models\[1\]: served_model_name: unset, and the name the model gets "
        rf"from where it was loaded, '{tiny_model_dir.name}', is also a name of "
        rf".*models\[0\]'s model",
    ):
        build_app(s)
    assert "chatserve-engine" not in {t.name for t in threading.enumerate()} - before


def test_kv_pool_shares_on_one_gpu():
    # equal parts of 0.9 of what is free once all are loaded: each engine's fraction of what it sees
    assert kv_fractions([None, None]) == pytest.approx([0.45, 0.45 / 0.55])
    assert kv_fractions([0.6, None]) == pytest.approx([0.6, 0.3 / 0.4])
    with pytest.raises(ConfigError, match="ask for 1.2"):
        kv_fractions([0.6, 0.6])
    with pytest.raises(ConfigError, match="leaving nothing"):
        kv_fractions([0.95, None])


def test_serve_two_configs_end_to_end(tiny_model_dir, tmp_path):
    """`chatserve serve --config a.yaml --config b.yaml` (the same folder twice, under two names),
    JSON logs: /ready, /v1/models, routing, and the access line of each request."""
    import socket

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"model: {tiny_model_dir}\nserved_model_name: one\ndevice: cpu\ndtype: float32\n")
    b.write_text(
        f"model: {tiny_model_dir}\nserved_model_name: [two, deux]\ndevice: cpu\ndtype: float32\nmax_running: 2\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--config",
            str(a),
            "--config",
            str(b),
            "--port",
            str(port),
            "--log-format",
            "json",
            "--log-level",
            "info",
            "--no-playground",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(base + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            time.sleep(0.2)
        assert httpx.get(base + "/ready").json()["models"] == ["one", "two"]
        assert [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]] == ["one", "two", "deux"]
        replies = {}
        for name in ("one", "deux"):
            r = httpx.post(
                base + CHAT,
                json={"model": name, "messages": HI, "max_tokens": 3, "ignore_eos": True},
                headers={"X-Request-Id": f"req-{name}"},
                timeout=60,
            )
            assert r.status_code == 200 and r.json()["model"] == name and r.headers["x-request-id"] == f"req-{name}"
            replies[name] = r.json()
        health = httpx.get(base + "/health").json()["models"]
        assert health["one"]["stats"]["finished_length"] == health["two"]["stats"]["finished_length"] == 1

        def access(rid):
            return [
                d
                for d in map(json.loads, list(lines))
                if d.get("logger") == "chatserve.access" and d.get("request_id") == rid
            ]

        # the access line is written once the last byte is sent: wait for it, within a deadline
        deadline = time.monotonic() + 30
        while not (access("req-one") and access("req-deux")) and time.monotonic() < deadline:
            time.sleep(0.05)
        for name, model in (("one", "one"), ("deux", "two")):
            (line,) = access(f"req-{name}")
            assert line["status"] == 200 and line["method"] == "POST" and line["path"] == CHAT
            assert line["model"] == model and line["id"] == replies[name]["id"] and line["stream"] is False
            assert line["completion_tokens"] == 3 == replies[name]["usage"]["completion_tokens"]
            assert line["prompt_tokens"] == replies[name]["usage"]["prompt_tokens"]
            assert line["level"] == "info" and isinstance(line["latency"], float) and line["latency"] > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        reader.join(timeout=10)
        assert lines and all(isinstance(json.loads(ln), dict) for ln in lines)  # every line, uvicorn's too
        assert any(json.loads(ln)["logger"].startswith("uvicorn") for ln in lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
