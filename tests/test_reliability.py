"""Regression tests for requests that validation accepts but that used to break the server.

- sampling parameters at the edge of float32 (temperature 1e-45, top_p 5e-324) made the softmax
  NaN, torch.multinomial raised, and the whole running batch failed;
- a JSON schema holding U+10FFFD (the constraint compiler's END marker) failed the batch in the
  middle of generation;
- logit_bias keys that str.isdigit() accepts but int() does not gave a 500;
- a 10 MB prompt was tokenized on the event loop (~15 s during which /health did not answer).

Everything HTTP goes through a real uvicorn server on the tiny random-weight model, and every
test compares real values: greedy text against greedy text, token ids against argmax.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import torch
from conftest import make_engine, serve_engine
from test_api import CHAT, MSGS, assert_error, chat, content_of, finish_of, stream_events, stream_text
from tiny_models import build_tiny_llama

from engine.prompt import chars_per_token_bound
from engine.request import SamplingParams
from engine.sampling import RowState, sample_batch

TINY_TEMPERATURES = [1e-45, 1e-38, 1e-6]
TINY_TOP_PS = [1e-46, 5e-324, 1e-30]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------------- sampling (engine)
def _logits(dtype: torch.dtype, rows: int = 3, vocab: int = 400) -> tuple[torch.Tensor, list[int]]:
    """Random logits with one clear maximum per row (ties in half precision would make argmax
    ambiguous), and those maxima."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=g) * 4
    top = [7, 123, 399][:rows]
    for i, t in enumerate(top):
        logits[i, t] = logits[i].max() + 2.0
    return logits.to(dtype), top


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
def test_tiny_temperature_is_greedy(dtype, temperature):
    logits, top = _logits(dtype)
    rows = [
        RowState(SamplingParams(temperature=temperature, seed=i), "cpu", logits.shape[1], [0]) for i in range(len(top))
    ]
    assert all(r.generator is None for r in rows)  # decided up front: no draw, no division
    tokens, _ = sample_batch(logits.clone(), rows)
    assert tokens == top


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("top_p", TINY_TOP_PS)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_tiny_top_p_keeps_the_top_token(dtype, top_p, temperature):
    logits, top = _logits(dtype)
    rows = [
        RowState(SamplingParams(temperature=temperature, top_p=top_p, seed=i), "cpu", logits.shape[1], [0])
        for i in range(len(top))
    ]
    assert all(r.generator is not None for r in rows)
    tokens, _ = sample_batch(logits.clone(), rows)
    assert tokens == top  # only the first sorted token survives a top_p this small


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_half_logits_sample_in_float32(dtype):
    """A mixed batch (greedy, tiny temperature, seeded sampling with top_p, penalties, logprobs) on
    half-precision logits: valid ids, the same draws as from the float32 copy, float32 logprobs."""
    logits, top = _logits(dtype)
    params = [
        SamplingParams(temperature=0.0, logprobs=True),
        SamplingParams(temperature=1e-38, frequency_penalty=2.0, presence_penalty=2.0),
        SamplingParams(temperature=1.3, top_p=0.9, seed=5, logit_bias={3: 100.0}),
    ]

    def run(x):
        rows = [RowState(p, "cpu", x.shape[1], [0]) for p in params]
        return sample_batch(x.clone(), rows)

    tokens, raw_lp = run(logits)
    assert tokens[:2] == top[:2] and 0 <= tokens[2] < logits.shape[1]
    assert raw_lp.dtype == torch.float32 and torch.isfinite(raw_lp).all()
    tokens32, raw_lp32 = run(logits.float())
    assert tokens == tokens32 and torch.equal(raw_lp, raw_lp32)


# ---------------------------------------------------------------------------------- sampling (HTTP)
BAD_SAMPLING = [
    {"temperature": 1e-45},
    {"temperature": 1e-38},
    {"top_p": 1e-46},
    {"top_p": 5e-324},
    {"temperature": 1e-45, "top_p": 5e-324},
]


def test_degenerate_sampling_params_do_not_fail_the_batch(client, tiny_server, tiny_engine):
    """A long greedy stream is decoding when the degenerate requests join its batch: all of them
    answer 200, the degenerate ones with the greedy text (a near-zero temperature is argmax, a
    near-zero top_p keeps only the top token), the stream with the same text as alone."""
    prompt_tokens = chat(client, max_tokens=1)["usage"]["prompt_tokens"]
    normal = dict(messages=MSGS, temperature=0, max_tokens=tiny_engine.max_model_len - prompt_tokens, ignore_eos=True)
    alone = stream_events(client, **normal)
    assert finish_of(alone) == "length"
    short = dict(messages=MSGS, max_tokens=4)
    greedy = content_of(chat(client, **short, temperature=0))

    async def main():
        async with httpx.AsyncClient(base_url=tiny_server.base_url, timeout=120) as c:
            async with c.stream("POST", CHAT, json={**normal, "stream": True}) as r:
                assert r.status_code == 200
                lines = []
                it = r.aiter_lines()
                while sum('"content":"' in line and '"content":""' not in line for line in lines) < 1:
                    lines.append(await it.__anext__())  # the stream is decoding now
                bad = await asyncio.gather(*[c.post(CHAT, json={**short, **b}) for b in BAD_SAMPLING])
                running = (await c.get("/health")).json()["running"]
                lines += [line async for line in it]
        return [line for line in lines if line], bad, running

    lines, bad, running = asyncio.run(main())
    assert running >= 1  # the stream was still decoding when the degenerate requests finished
    for body, r in zip(BAD_SAMPLING, bad):
        assert r.status_code == 200, (body, r.text)
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length"), body
        assert content_of(r.json()) == greedy, body
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert all("error" not in c for c in chunks), [c for c in chunks if "error" in c]
    assert lines[-1] == "data: [DONE]"
    assert finish_of(chunks) == "length"
    assert stream_text(chunks) == stream_text(alone)


# ---------------------------------------------------------------------------------- U+10FFFD in a schema
@pytest.fixture(scope="module")
def wide_client(tmp_path_factory):
    """A server on a tiny model with a 2048-token context: tool definitions do not fit in 256."""
    engine = make_engine(build_tiny_llama(tmp_path_factory.mktemp("tiny-wide"), max_position_embeddings=2048))
    try:
        with serve_engine(engine) as srv, httpx.Client(base_url=srv.base_url, timeout=120) as c:
            yield c
    finally:
        engine.stop()


def _post_raw(client: httpx.Client, body: dict) -> httpx.Response:
    # ensure_ascii: the character travels as the JSON escape "\udbff\udffd", as in the report
    return client.post(
        CHAT, content=json.dumps(body, ensure_ascii=True).encode(), headers={"content-type": "application/json"}
    )


@pytest.mark.parametrize("char", ["\U0010fffd", "\U00100000"], ids=["U+10FFFD", "U+100000"])
def test_unrepresentable_character_in_schema_is_a_400(wide_client, char):
    client = wide_client
    name = f"U+{ord(char):06X}"
    schema = {"type": "string", "const": char}
    r = _post_raw(
        client,
        {
            "messages": MSGS,
            "max_tokens": 8,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        },
    )
    err = assert_error(r, 400, param="response_format", code="invalid_schema", contains=(name,))
    assert err["type"] == "invalid_request_error"
    tool = {
        "type": "function",
        "function": {
            "name": "pick",
            "parameters": {"type": "object", "properties": {"v": {"enum": ["a", "b" + char]}}, "required": ["v"]},
        },
    }
    r = _post_raw(client, {"messages": MSGS, "max_tokens": 8, "tools": [tool], "tool_choice": "required"})
    assert_error(r, 400, param="tools", code="invalid_schema", contains=(name, "/properties/v/enum/1"))
    # the server goes on serving, constrained decoding included
    plain = chat(client, max_tokens=2, temperature=0)
    assert plain["choices"][0]["finish_reason"] in ("stop", "length") and plain["usage"]["completion_tokens"] >= 1
    ok = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "const": "ok"}}}
    r = chat(client, max_tokens=8, temperature=0, response_format=ok)
    assert json.loads(content_of(r)) == "ok" and r["choices"][0]["finish_reason"] == "stop"


# ---------------------------------------------------------------------------------- logit_bias keys
@pytest.mark.parametrize(
    "key",
    ["²", "--5", "٣", " 5", "+5", "5 ", "-5", "", "0x5", "9" * 5000],
    ids=[
        "superscript",
        "double-minus",
        "arabic-indic",
        "leading-space",
        "plus",
        "trailing-space",
        "negative",
        "empty",
        "hex",
        "5000-digits",
    ],
)
def test_bad_logit_bias_keys_are_400(client, key):
    r = client.post(CHAT, json={"messages": MSGS, "max_tokens": 2, "logit_bias": {key: 5}})
    err = assert_error(r, 400, param="logit_bias", code="invalid_value")
    assert repr(key)[:40] in err["message"]


def test_valid_logit_bias_key(client, tiny_engine):
    r = chat(client, max_tokens=4, temperature=0, logit_bias={"5": 100, "0007": 0})
    assert r["usage"]["completion_tokens"] == 4
    assert content_of(r) == tiny_engine.tokenizer.decode([5] * 4)


# ---------------------------------------------------------------------------------- huge prompts
def test_chars_per_token_bound_holds(tiny_engine):
    tok = tiny_engine.tokenizer
    bound = chars_per_token_bound(tok)
    assert bound == max(len(t) for t in tok.get_vocab())  # byte-level, no normalizer: the longest piece
    assert all(len(tok.decode([i])) <= bound for i in range(len(tok)))
    for text in [
        "a" * 5000,
        " " * 5000,
        "The quick brown fox jumps over the lazy dog. " * 100,
        "日本語のテキスト😀" * 300,
        "<|im_start|>" * 100,
    ]:
        assert len(text) <= bound * len(tok(text, add_special_tokens=False)["input_ids"])


def test_huge_prompt_is_refused_without_stalling_the_server(tiny_server, tiny_engine):
    """A ~10 MB message is refused from its length in characters (not tokenized: that took ~15 s
    on the event loop), and /health keeps answering while the request is handled."""
    body = json.dumps({"messages": [{"role": "user", "content": "a" * 10_000_000}]}).encode()
    result: dict = {}

    def send_big():
        with httpx.Client(base_url=tiny_server.base_url, timeout=120) as c:
            result["response"] = c.post(CHAT, content=body, headers={"content-type": "application/json"})

    latencies = []
    with httpx.Client(base_url=tiny_server.base_url, timeout=120) as c:
        assert c.get("/health").status_code == 200  # connection open before the clock starts
        big = threading.Thread(target=send_big)
        big.start()
        while big.is_alive():
            t0 = time.perf_counter()
            assert c.get("/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
        big.join()
    err = assert_error(result["response"], 400, param="messages", code="context_length_exceeded")
    assert "characters" in err["message"] and str(tiny_engine.max_model_len) in err["message"]
    assert latencies, "no /health request was made while the big request was in flight"
    assert max(latencies) < 1.0, max(latencies)


def test_prompt_under_the_character_bound_still_counts_tokens(client, tiny_engine):
    """A prompt short enough in characters to maybe fit is tokenized and measured in tokens."""
    limit = tiny_engine.prompts.max_prompt_chars(tiny_engine.max_model_len)
    text = "ab " * (limit // 3 - 20)
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": text}]})
    err = assert_error(r, 400, param="messages", code="context_length_exceeded")
    assert "tokens" in err["message"] and "characters" not in err["message"]


def test_prompt_rendering_runs_off_the_event_loop(client, tiny_server, tiny_engine, monkeypatch):
    """Rendering waits until /health has answered: on the event loop that could never happen (the
    /health request times out), off it both requests succeed."""
    started, health_answered = threading.Event(), threading.Event()
    render = tiny_engine.render_prompt

    def blocked_render(*args, **kwargs):
        started.set()
        health_answered.wait(timeout=20)
        return render(*args, **kwargs)

    monkeypatch.setattr(tiny_engine, "render_prompt", blocked_render)
    result: dict = {}
    worker = threading.Thread(
        target=lambda: result.update(r=client.post(CHAT, json={"messages": MSGS, "max_tokens": 2, "temperature": 0}))
    )
    worker.start()
    try:
        assert started.wait(timeout=20)
        with httpx.Client(base_url=tiny_server.base_url, timeout=5) as c:
            assert c.get("/health").json()["status"] == "ok"
    finally:
        health_answered.set()
        worker.join()
    monkeypatch.undo()
    assert result["r"].status_code == 200, result["r"].text
    assert content_of(result["r"].json()) == content_of(chat(client, max_tokens=2, temperature=0))
