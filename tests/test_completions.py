"""POST /v1/completions (OpenAI's legacy shape) over HTTP on the tiny random-weight model: prompt
logprobs against the model's own log_softmax (alone and inside a busy batch), generated tokens
against model.generate, several prompts and n choices per request, streaming, text offsets, every
refusal, shared admission (429) and disconnects, the OpenAPI document and the openai SDK.

The engine here prefills 16 tokens per step, so the longer prompts are scored over several chunks.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from conftest import make_engine, serve_engine
from fuzz_long import doc_validator
from test_api import CHAT, MSGS, _sse_chunks, assert_error, concurrently, slowed, wait_for, wait_idle

COMP = "/v1/completions"
TEXT = (
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog. Hello! How can I help "
    "you today? def add(a, b): return a + b"
)
MULTIBYTE = "Café, naïve, über: 日本語のテキスト and emoji 😀🎉 mixed with words."
TOL = 1e-4


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = make_engine(tiny_model_dir, prefill_chunk=16)
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def server(engine):
    with serve_engine(engine) as srv:
        yield srv


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        yield c


def complete(client: httpx.Client, **body) -> dict:
    r = client.post(COMP, json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def acomplete(client: httpx.AsyncClient, **body) -> dict:
    r = await client.post(COMP, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream_chunks(client: httpx.Client, **body) -> list[dict]:
    with client.stream("POST", COMP, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read().decode()
        assert r.headers["content-type"].startswith("text/event-stream")
        return _sse_chunks([line for line in r.iter_lines() if line])


def ids_of(engine, text: str) -> list[int]:
    return engine.encode_text(text)[0]


def log_softmax(engine, ids: list[int]) -> torch.Tensor:
    """The reference: log_softmax of the model's logits over the whole sequence, one plain forward."""
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def check_scores(engine, ids: list[int], lp: dict, ref: torch.Tensor, top: int) -> None:
    """Echoed logprobs of `ids` (the prompt, or prompt + completion) equal the reference."""
    assert lp["tokens"][: len(ids)] == [t for t, _ in engine.token_texts(ids)]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for p in range(1, len(ids)):
        assert abs(lp["token_logprobs"][p] - float(ref[p - 1, ids[p]])) < TOL, p
        alts = lp["top_logprobs"][p]
        assert abs(max(alts.values()) - float(ref[p - 1].max())) < TOL, p
        # the top alternatives and the token itself (alternatives with the same text count once)
        assert lp["tokens"][p] in alts and 1 <= len(alts) <= top + 1, alts


def same_choice(a: dict, b: dict) -> None:
    """Two runs of one choice: the same text and tokens, logprobs equal to float noise (rows batched
    otherwise sum in another order)."""
    assert (a["text"], a["finish_reason"]) == (b["text"], b["finish_reason"])
    la, lb = a["logprobs"], b["logprobs"]
    assert la["tokens"] == lb["tokens"] and la["text_offset"] == lb["text_offset"]
    assert la["token_logprobs"][0] is None is lb["token_logprobs"][0]
    assert la["token_logprobs"][1:] == pytest.approx(lb["token_logprobs"][1:], abs=TOL)


# ---------------------------------------------------------------------------------- numbers
def test_prompt_logprobs_equal_log_softmax_of_the_model_logits_alone_and_in_a_busy_batch(client, server, engine):
    ids = ids_of(engine, TEXT)
    assert len(ids) > 3 * 16  # several prefill chunks
    ref = log_softmax(engine, ids)
    body = complete(client, prompt=ids, echo=True, logprobs=3, max_tokens=0)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["text"] == engine.decode_prompt(ids) == TEXT
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 0,
        "total_tokens": len(ids),
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    lp = choice["logprobs"]
    assert all(len(lp[k]) == len(ids) for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset"))
    check_scores(engine, ids, lp, ref, top=3)

    # the same scores while other rows decode in the same steps, beside a text prompt scored with
    # them and a request that generates after scoring
    others = ["Hello! How can I help you today?", "Numbers 0 1 2 3 4 5", "def add(a, b):"]

    def jobs(c):
        return [
            acomplete(c, prompt=ids, echo=True, logprobs=3, max_tokens=0),
            *[
                c.post(
                    CHAT,
                    json={
                        "messages": [{"role": "user", "content": t}],
                        "max_tokens": 24,
                        "ignore_eos": True,
                        "temperature": 0,
                    },
                )
                for t in others
            ],
            acomplete(c, prompt=others, max_tokens=20, ignore_eos=True, temperature=0.7, seed=3),
            acomplete(c, prompt=TEXT, echo=True, logprobs=3, max_tokens=0),
            acomplete(c, prompt=[ids, ids[:20]], echo=True, logprobs=1, max_tokens=4, temperature=0),
        ]

    results = concurrently(server.base_url, jobs)
    assert all(r.status_code == 200 for r in results[1:4])
    check_scores(engine, ids, results[0]["choices"][0]["logprobs"], ref, top=3)
    scored_text = results[5]["choices"][0]
    assert scored_text["text"] == TEXT
    check_scores(engine, ids, scored_text["logprobs"], ref, top=3)
    for choice, prompt in zip(results[6]["choices"], [ids, ids[:20]]):
        check_scores(engine, prompt, choice["logprobs"], log_softmax(engine, prompt), top=1)
        assert len(choice["logprobs"]["tokens"]) > len(prompt)  # and then it generated
    wait_idle(engine)


def test_generated_tokens_equal_model_generate_and_their_logprobs_the_model_logits(client, engine):
    ids = ids_of(engine, "The capital of France is")
    with torch.inference_mode():
        out = engine.model.generate(
            torch.tensor([ids]),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=engine.eos_ids,
            pad_token_id=engine.eos_ids[0],
        )[0].tolist()
    generated = out[len(ids) :]
    if generated[-1] in engine.eos_ids:  # the EOS ends the text and has no logprob entry
        generated = generated[:-1]
    full = ids + generated
    body = complete(client, prompt=ids, echo=True, logprobs=2, max_tokens=8, temperature=0)
    [choice] = body["choices"]
    assert choice["text"] == engine.decode_prompt(ids) + engine.tokenizer.decode(generated, skip_special_tokens=True)
    assert body["usage"]["completion_tokens"] == len(out) - len(ids)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(full)
    check_scores(engine, full, lp, log_softmax(engine, full), top=2)
    # greedy: every generated token is its position's best
    for p in range(len(ids), len(full)):
        assert lp["token_logprobs"][p] == max(lp["top_logprobs"][p].values())
    # without echo: the completion alone, the same tokens and logprobs
    plain = complete(client, prompt=ids, logprobs=2, max_tokens=8, temperature=0)["choices"][0]
    assert plain["text"] == choice["text"][len(engine.decode_prompt(ids)) :]
    assert plain["logprobs"]["tokens"] == lp["tokens"][len(ids) :]
    assert plain["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"][len(ids) :], abs=TOL)
    shift = len(engine.decode_prompt(ids))
    assert plain["logprobs"]["text_offset"] == [o - shift for o in lp["text_offset"][len(ids) :]]


def test_an_eos_that_ends_the_text_is_listed_in_the_logprobs(client, engine):
    """OpenAI's legacy logprobs list every generated token, the EOS too (harnesses send echo with
    max_tokens 1 and drop the last entry as the generated token). Chat leaves it out."""
    ids = ids_of(engine, "The capital of France is")
    eos = engine.eos_ids[0]
    body = complete(client, prompt=ids, echo=True, logprobs=1, max_tokens=5, temperature=0, logit_bias={str(eos): 100})
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 1
    assert choice["text"] == engine.decode_prompt(ids)  # the EOS has no text
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["tokens"][-1] == engine.token_texts([eos])[0][0]
    ref = log_softmax(engine, ids + [eos])
    assert abs(lp["token_logprobs"][-1] - float(ref[len(ids) - 1, eos])) < TOL  # raw: before the bias
    assert lp["text_offset"][-1] == len(choice["text"])
    chat = client.post(
        CHAT,
        json={"messages": MSGS, "logprobs": True, "max_tokens": 5, "temperature": 0, "logit_bias": {str(eos): 100}},
    ).json()["choices"][0]
    assert chat["finish_reason"] == "stop" and chat["logprobs"]["content"] == []


# ---------------------------------------------------------------------------------- prompts and choices
def test_several_prompts_are_each_their_own_choice_equal_to_asking_alone(client, engine):
    prompts = ["The capital of France", "Hello! How can", "def add(a, b):"]
    alone = [complete(client, prompt=p, max_tokens=6, temperature=0, echo=True, logprobs=1) for p in prompts]
    for batch in (prompts, [ids_of(engine, p) for p in prompts]):
        body = complete(client, prompt=batch, max_tokens=6, temperature=0, echo=True, logprobs=1)
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        for choice, single in zip(body["choices"], alone):
            same_choice(choice, single["choices"][0])
        assert body["usage"]["prompt_tokens"] == sum(len(ids_of(engine, p)) for p in prompts)
        assert body["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
    # a single token-id list is one prompt, a list of one string too
    assert len(complete(client, prompt=ids_of(engine, prompts[0]), max_tokens=2)["choices"]) == 1
    assert len(complete(client, prompt=[prompts[0]], max_tokens=2)["choices"]) == 1


def test_n_choices_come_prompt_by_prompt_with_seed_plus_i(client, engine):
    prompts = ["The quick brown fox", "Numbers 0 1 2"]
    body = complete(client, prompt=prompts, n=3, seed=7, temperature=1.0, max_tokens=8, ignore_eos=True)
    assert [c["index"] for c in body["choices"]] == list(range(6))
    texts = [c["text"] for c in body["choices"]]
    for i, p in enumerate(prompts):
        for j in range(3):
            one = complete(client, prompt=p, seed=7 + j, temperature=1.0, max_tokens=8, ignore_eos=True)
            assert texts[i * 3 + j] == one["choices"][0]["text"], (i, j)
    assert len(set(texts[:3])) > 1  # other seeds, other samples
    assert body["usage"]["completion_tokens"] == 6 * 8
    # each prompt's tokens count once, not n times
    assert body["usage"]["prompt_tokens"] == sum(len(ids_of(engine, p)) for p in prompts)


def test_stream_equals_non_stream_for_every_choice(client):
    body = dict(
        prompt=["The capital of France", "Hello!"],
        n=2,
        seed=1,
        temperature=0.8,
        max_tokens=10,
        echo=True,
        logprobs=2,
        stop=["e"],
    )
    whole = complete(client, **body)
    chunks = stream_chunks(client, **body, stream_options={"include_usage": True})
    *parts, last = chunks
    assert last["choices"] == [] and last["usage"] == whole["usage"]
    assert all(c["usage"] is None and len(c["choices"]) == 1 and c["object"] == "text_completion" for c in parts)
    assert len({c["id"] for c in chunks}) == 1
    for choice in whole["choices"]:
        mine = [c["choices"][0] for c in parts if c["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [choice["finish_reason"]]
        assert mine[-1]["finish_reason"] is not None
        joined = {k: [x for c in mine if c["logprobs"] for x in c["logprobs"][k]] for k in choice["logprobs"]}
        assert joined == choice["logprobs"]
        assert "e" not in choice["text"][len(body["prompt"][choice["index"] // 2]) :]  # stop string held back
    # without include_usage: no usage key at all, and no usage chunk
    plain = stream_chunks(client, prompt="Hi", max_tokens=3)
    assert all("usage" not in c and c["choices"] for c in plain)


def test_text_offsets_point_into_the_text(client, engine):
    for echo in (True, False):
        choice = complete(client, prompt=MULTIBYTE, echo=echo, logprobs=0, max_tokens=12, temperature=0)["choices"][0]
        text, lp = choice["text"], choice["logprobs"]
        offsets = lp["text_offset"]
        assert offsets == sorted(offsets) and all(0 <= o <= len(text) for o in offsets)
        assert all(len(alts) == 1 for alts in lp["top_logprobs"] if alts is not None)  # logprobs 0: the token
        for token, at in zip(lp["tokens"], offsets):
            if "\ufffd" not in token:  # a whole character (or more) of text
                assert text[at : at + len(token)] == token, (token, at, text)
        if echo:
            n = len(ids_of(engine, MULTIBYTE))
            assert text.startswith(MULTIBYTE) and offsets[0] == 0 and len(offsets) > n
            assert offsets[n] == len(MULTIBYTE)  # the completion starts where the prompt ends


def test_max_tokens_default_and_echo_without_logprobs(client, engine):
    body = complete(client, prompt="Hello", ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 16 and body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["logprobs"] is None
    echoed = complete(client, prompt="Hello there", echo=True, max_tokens=0)["choices"][0]
    assert echoed == {"index": 0, "text": "Hello there", "logprobs": None, "finish_reason": "length"}


# ---------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "body,param,code",
    [
        ({"suffix": " and then"}, "suffix", "unsupported_value"),
        ({"best_of": 2}, "best_of", "unsupported_value"),
        ({"n": 2, "best_of": 3}, "best_of", "unsupported_value"),
        ({"prompt": []}, "prompt", "invalid_value"),
        ({"prompt": [[1, 2], []]}, "prompt", "invalid_value"),
        ({"prompt": [1, 100000]}, "prompt", "invalid_value"),
        ({"prompt": [[1, 2], [-1]]}, "prompt", "invalid_value"),
        ({"prompt": [1, "a"]}, "prompt", "invalid_type"),
        ({"prompt": [["a"]]}, "prompt", "invalid_type"),
        ({"prompt": 5}, "prompt", "invalid_type"),
        ({"prompt": ""}, "prompt", "invalid_value"),
        ({"prompt": None}, "prompt", "invalid_type"),
        ({"prompt": "x" * 100_000}, "prompt", "context_length_exceeded"),
        ({"prompt": list(range(300))}, "prompt", "context_length_exceeded"),
        ({"prompt": list(range(250)), "max_tokens": 10}, "max_tokens", "context_length_exceeded"),
        ({"logprobs": 6}, "logprobs", "invalid_value"),
        ({"logprobs": True}, "logprobs", "invalid_type"),
        ({"max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"max_tokens": -1, "echo": True}, "max_tokens", "invalid_value"),
        ({"n": 0}, "n", "invalid_value"),
        ({"n": 129}, "n", "invalid_value"),
        ({"n": 100, "prompt": ["a", "b", "c"]}, "n", "invalid_value"),  # more than the engine ever holds
        ({"temperature": 3}, "temperature", "invalid_value"),  # the fields chat shares
        ({"top_p": 0}, "top_p", "invalid_value"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "invalid_value"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"seed": 2**64}, "seed", "invalid_value"),
    ],
)
def test_bad_requests_are_400s_naming_the_field(client, body, param, code):
    assert_error(client.post(COMP, json={"prompt": "Hello", **body}), 400, param=param, code=code)


def test_unknown_model_and_missing_prompt(client, engine):
    assert_error(client.post(COMP, json={"prompt": "Hi", "model": "gpt-4"}), 404, param="model", code="model_not_found")
    assert_error(client.post(COMP, json={"model": engine.model_name}), 400, param="prompt", code="missing_field")
    assert complete(client, prompt="Hi", model=engine.model_name, max_tokens=1)["model"] == engine.model_name


def test_the_fallback_engine_refuses_scoring_with_a_clear_400(tiny_model_dir):
    eng = make_engine(tiny_model_dir, packed=False)
    try:
        assert not eng.scores_prompts
        with serve_engine(eng) as srv, httpx.Client(base_url=srv.base_url, timeout=60) as c:
            for body in ({"echo": True, "logprobs": 1}, {"echo": True, "max_tokens": 0}):
                assert_error(
                    c.post(COMP, json={"prompt": "Hello", **body}),
                    400,
                    param="echo",
                    code="unsupported_value",
                    contains=("fallback",),
                )
            ok = complete(c, prompt=["Hello", "Hi"], max_tokens=3, logprobs=1, echo=False)
            assert len(ok["choices"]) == 2 and all(len(ch["logprobs"]["tokens"]) >= 1 for ch in ok["choices"])
    finally:
        eng.stop()


# ---------------------------------------------------------------------------------- admission and disconnects
@pytest.fixture(scope="module")
def small_engine(tiny_model_dir):
    eng = slowed(make_engine(tiny_model_dir, max_running=1, max_waiting=1), 0.02)
    yield eng
    eng.stop()


def test_admission_is_shared_with_chat(small_engine):
    """One running chat + a two-prompt completion: the second prompt finds the queue full, so the
    whole request is a 429 and its first prompt leaves the queue again."""
    with serve_engine(small_engine) as srv, httpx.Client(base_url=srv.base_url, timeout=60) as c:
        with c.stream(
            "POST", CHAT, json={"messages": MSGS, "max_tokens": 200, "ignore_eos": True, "stream": True}
        ) as chat_stream:
            assert chat_stream.status_code == 200
            lines = chat_stream.iter_lines()  # held: a dropped iterator would close the connection
            next(line for line in lines if line)  # it runs
            r = c.post(COMP, json={"prompt": ["Hello", "Hi"], "max_tokens": 2})
            assert_error(r, 429, code="server_overloaded")
            assert int(r.headers["Retry-After"]) >= 1
            wait_for(lambda: small_engine.num_waiting == 0, what="the admitted prompt to leave the queue")
            assert small_engine.num_running == 1
        wait_idle(small_engine)
        assert len(complete(c, prompt=["Hello", "Hi"], max_tokens=2)["choices"]) == 2


def test_a_client_that_hangs_up_aborts_every_choice(server, engine):
    async def scenario(base_url):
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as c:
            async with c.stream(
                "POST", COMP, json={"prompt": "Hello", "n": 2, "max_tokens": 200, "ignore_eos": True, "stream": True}
            ) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        break  # one chunk in, then hang up

    wait_idle(engine)
    before = engine.stats["finished_abort"]
    slowed(engine, 0.02)
    try:
        asyncio.run(scenario(server.base_url))
        wait_idle(engine)
    finally:
        del engine.step  # the class's own step again
    assert engine.stats["finished_abort"] == before + 2


def test_metrics_count_completions_like_chat(client, engine):
    """/metrics: requests by endpoint and status, and each choice's tokens and timings."""
    from test_ops import delta, scrape

    model = engine.model_name
    before = scrape(client)
    body = complete(client, prompt=["Hello", "The capital"], n=2, max_tokens=3, ignore_eos=True)
    complete(client, prompt="Hello there", echo=True, logprobs=1, max_tokens=0)
    assert client.post(COMP, json={"prompt": "Hi", "suffix": "x"}).status_code == 400
    after = scrape(client)
    assert delta(after, before, "chatserve_requests_total", model=model, endpoint="completions", status="200") == 2
    assert delta(after, before, "chatserve_requests_total", model=model, endpoint="completions", status="400") == 1
    assert delta(after, before, "chatserve_generation_tokens_total", model=model) == 4 * 3
    assert delta(after, before, "chatserve_prompt_tokens_total", model=model) == 2 * body["usage"][
        "prompt_tokens"
    ] + len(ids_of(engine, "Hello there"))  # per choice, as the engine ran them
    assert delta(after, before, "chatserve_time_to_first_token_seconds_count", model=model) == 4
    assert delta(after, before, "chatserve_request_queue_time_seconds_count", model=model) == 5


# ---------------------------------------------------------------------------------- OpenAPI and clients
def test_openapi_documents_the_route_and_responses_match_it(client):
    doc = client.get("/openapi.json").json()
    op = doc["paths"][COMP]["post"]
    ref = "#/components/schemas/"
    assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": ref + "CompletionRequest"}
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": ref + "Completion"}
    stream = op["responses"]["200"]["content"]["text/event-stream"]["schema"]["properties"]["data"]["anyOf"]
    assert {"$ref": ref + "CompletionChunk"} in stream[1]["contentSchema"]["anyOf"]
    assert set(op["responses"]) == {"200", "400", "401", "404", "408", "413", "429", "500", "503"}
    request = doc["components"]["schemas"]["CompletionRequest"]
    assert request["required"] == ["prompt"] and {"echo", "logprobs", "suffix", "best_of"} <= set(request["properties"])
    doc_validator(doc, "Completion").validate(
        complete(client, prompt=["Hi", "Hello"], echo=True, logprobs=2, max_tokens=2)
    )
    for chunk in stream_chunks(
        client, prompt="Hi", echo=True, logprobs=1, max_tokens=2, stream_options={"include_usage": True}
    ):
        doc_validator(doc, "CompletionChunk").validate(chunk)
    from openapi_spec_validator import validate

    validate(doc)


def test_openai_sdk(server, engine):
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    scored = client.completions.create(
        model=engine.model_name, prompt=["Hello there", "The capital"], echo=True, logprobs=1, max_tokens=0
    )
    assert [c.index for c in scored.choices] == [0, 1]
    assert scored.choices[0].text == "Hello there"
    assert scored.choices[0].logprobs.token_logprobs[0] is None
    assert len(scored.choices[1].logprobs.tokens) == len(ids_of(engine, "The capital"))
    text = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(
            model=engine.model_name, prompt="Hello", max_tokens=5, temperature=0, stream=True
        )
        if chunk.choices
    )
    assert (
        text
        == client.completions.create(model=engine.model_name, prompt="Hello", max_tokens=5, temperature=0)
        .choices[0]
        .text
    )
    assert json.loads(scored.model_dump_json())["object"] == "text_completion"


# ---------------------------------------------------------------------------------- fuzzing
def test_validation_gives_a_request_or_a_4xx_for_any_body(engine):
    """parse_body -> validate_completion -> tokenize_and_fit on 300 hypothesis bodies: a
    ValidatedCompletion or an APIError with a 4xx, never another exception (a 500 on the wire).
    Schemathesis fuzzes the route itself in tests/test_api_surface.py (fuzz_long.OPERATIONS)."""
    from collections import Counter

    from fuzz_long import NASTY, NASTY_STRINGS
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from server.errors import APIError
    from server.protocol import CompletionRequest
    from server.validation import parse_body, tokenize_and_fit, validate_completion

    ids = st.integers(-2, engine.vocab_size + 2) | st.sampled_from([0, 2**63, -(2**63)])
    prompt = (
        st.text(max_size=40)
        | st.sampled_from(NASTY_STRINGS)
        | st.lists(st.text(max_size=12), max_size=3)
        | st.lists(ids, max_size=300)
        | st.lists(st.lists(ids, max_size=8), max_size=3)
        | st.sampled_from(NASTY)
    )
    value = st.sampled_from(NASTY) | st.integers(-3, 300)
    fields = st.fixed_dictionaries(
        {"prompt": prompt},
        optional={
            k: value
            for k in (
                "max_tokens",
                "n",
                "best_of",
                "logprobs",
                "echo",
                "temperature",
                "top_p",
                "seed",
                "stop",
                "suffix",
                "stream",
                "stream_options",
                "logit_bias",
                "min_tokens",
                "model",
            )
        },
    )
    outcomes: Counter = Counter()

    @settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(body=fields)
    def prop(body):
        try:
            raw = json.dumps(body).encode()
        except ValueError:
            return
        try:
            v = validate_completion(parse_body(raw, CompletionRequest), vocab_size=engine.vocab_size, max_choices=64)
            tokenize_and_fit(v, engine)
            assert all(p.ids and all(0 <= t < engine.vocab_size for t in p.ids) for p in v.prompts)
            outcomes["ok"] += 1
        except APIError as exc:
            assert 400 <= exc.status < 500, exc.message
            outcomes[f"{exc.status} {exc.code}"] += 1

    prop()
    assert outcomes["ok"] >= 5 and len(outcomes) >= 4, outcomes


def test_schemathesis_bodies_that_break_the_schema_are_all_refused(server, engine):
    from fuzz_long import load_schema, run_schema_fuzz

    statuses = run_schema_fuzz(
        load_schema(server.base_url),
        "POST /v1/completions",
        server.base_url,
        model_name=engine.model_name,
        examples=30,
        negative=True,
    )
    assert set(statuses) == {"400"}, statuses
