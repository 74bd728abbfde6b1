"""Structured output and tool calls over HTTP, on a tiny random-weight model.

The model's text is random, so nothing here compares against known outputs: every JSON reply is
parsed and validated against its schema, every tool call names a given tool and its arguments
validate against that tool's parameters, and streams are compared with the same greedy / seeded
request made without streaming.

The model is the conftest tiny Llama with a 2048-token context (tool definitions in the system
prompt take ~600 of its 400-token-vocabulary tokens) and "<tool_call>" / "</tool_call>" added as
ordinary single tokens (as Qwen's tokenizer has them): a logit_bias on that one token makes the
model open a call deterministically, which exercises tool_choice="auto"'s trigger over HTTP.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from conftest import make_engine, serve_engine
from test_api import CHAT, MSGS, assert_error, chat, finish_of, stream_events, stream_text
from tiny_models import build_tiny_llama

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer"},
        "label": {"type": "string", "maxLength": 8},
    },
    "required": ["color", "count", "label"],
    "additionalProperties": False,
}
RF_SCHEMA = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
PARAMS = {"get_weather": WEATHER, "add": ADD}
TOOLS = [
    {"type": "function", "function": {"name": name, "description": f"{name} tool", "parameters": p}}
    for name, p in PARAMS.items()
]

SEEDS = [0, 1, 2]
TOOL_KW = dict(tools=TOOLS, max_tokens=600)


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_llama(tmp_path_factory.mktemp("tiny-tools"), max_position_embeddings=2048)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens(["<tool_call>", "</tool_call>"])  # ordinary (non-special) added tokens
    model = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(0)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = make_engine(model_dir)
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def server(engine):
    with serve_engine(engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def trigger_id(engine) -> int:
    ids = engine.tokenizer.encode("<tool_call>", add_special_tokens=False)
    assert len(ids) == 1 and engine.tokenizer.decode(ids) == "<tool_call>"
    return ids[0]


# ---------------------------------------------------------------------------------- helpers
def message_of(resp: dict) -> dict:
    return resp["choices"][0]["message"]


def check_calls(calls: list[dict], names=tuple(PARAMS)) -> None:
    """Every call is well formed: id, type, a known name, arguments that validate."""
    assert calls
    for call in calls:
        assert call["id"].startswith("call_") and len(call["id"]) > len("call_")
        assert call["type"] == "function"
        assert call["function"]["name"] in names, call
        args = json.loads(call["function"]["arguments"])
        jsonschema.validate(args, PARAMS[call["function"]["name"]])
    assert len({c["id"] for c in calls}) == len(calls)


def check_tool_reply(resp: dict, names=tuple(PARAMS)) -> list[dict]:
    msg = message_of(resp)
    assert msg["content"] is None or isinstance(msg["content"], str)
    check_calls(msg["tool_calls"], names)
    assert resp["choices"][0]["finish_reason"] == "tool_calls"
    return msg["tool_calls"]


def streamed_calls(chunks: list[dict]) -> list[dict]:
    """Assemble streamed tool_calls deltas, checking the framing: the first delta of a call has
    index, id, type, name and arguments ""; later ones only index and argument fragments."""
    calls: dict[int, dict] = {}
    for c in chunks:
        if not c["choices"]:
            continue
        for d in c["choices"][0]["delta"].get("tool_calls") or []:
            i = d["index"]
            if i not in calls:
                assert i == len(calls), "calls are streamed in order"
                assert d["id"].startswith("call_") and d["type"] == "function"
                assert d["function"]["name"] in PARAMS and d["function"]["arguments"] == ""
                calls[i] = {
                    "id": d["id"],
                    "type": "function",
                    "function": {"name": d["function"]["name"], "arguments": ""},
                }
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}, d
                assert d["function"]["arguments"]
                calls[i]["function"]["arguments"] += d["function"]["arguments"]
    return [calls[i] for i in sorted(calls)]


def same_calls(a: list[dict], b: list[dict]) -> bool:
    """Same names and argument strings (ids are random per response)."""
    return [(c["function"]["name"], c["function"]["arguments"]) for c in a] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in b
    ]


# ---------------------------------------------------------------------------------- response_format
def test_json_object_stream_and_non_stream(client):
    for kw in [dict(temperature=0)] + [dict(temperature=1, seed=s) for s in SEEDS]:
        body = dict(response_format={"type": "json_object"}, max_tokens=120, **kw)
        r = chat(client, **body)
        text = message_of(r)["content"]
        assert isinstance(json.loads(text), dict), text
        assert r["choices"][0]["finish_reason"] == "stop"
        chunks = stream_events(client, **body)
        assert stream_text(chunks) == text
        assert finish_of(chunks) == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_validates(client, stream):
    texts = set()
    for kw in [dict(temperature=0)] + [dict(temperature=1, seed=s) for s in SEEDS]:
        body = dict(response_format=RF_SCHEMA, max_tokens=120, **kw)
        if stream:
            chunks = stream_events(client, **body)
            text, finish = stream_text(chunks), finish_of(chunks)
            assert text == message_of(chat(client, **body))["content"]
        else:
            r = chat(client, **body)
            text, finish = message_of(r)["content"], r["choices"][0]["finish_reason"]
        assert finish == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)
        texts.add(text)
    assert len(texts) > 1, "seeds should give different outputs"


@pytest.mark.parametrize(
    "rf",
    [
        {"type": "json", "value": SCHEMA},
        {"type": "json_schema", "value": {"name": "thing", "schema": SCHEMA}},
    ],
    ids=["json-value", "json_schema-value"],
)
def test_tgi_response_format_shapes(client, rf):
    for seed in SEEDS[:2]:
        r = chat(client, response_format=rf, temperature=1, seed=seed, max_tokens=120)
        jsonschema.validate(json.loads(message_of(r)["content"]), SCHEMA)


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_too_small_for_schema(client, stream):
    body = dict(response_format=RF_SCHEMA, temperature=0, max_tokens=4)
    if stream:
        chunks = stream_events(client, **body)
        text, finish = stream_text(chunks), finish_of(chunks)
    else:
        r = chat(client, **body)
        text, finish = message_of(r)["content"], r["choices"][0]["finish_reason"]
        assert r["usage"]["completion_tokens"] == 4
    assert finish == "length"
    assert text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_special_tokens_never_inside_constrained_output(client, engine):
    tok = engine.tokenizer
    specials = {"<|im_start|>", "<|endoftext|>", "<|im_end|>"}
    special_ids = [tok.convert_tokens_to_ids(s) for s in specials]
    assert set(tok.all_special_ids) == set(special_ids)
    # even a +100 bias on every special token (EOS included) cannot get one into the output:
    # the constraint masks them, and EOS only comes when the JSON is complete
    push = {str(i): 100 for i in special_ids}
    for kw in [dict(temperature=0), dict(temperature=0, logit_bias=push)] + [
        dict(temperature=1, seed=s, logit_bias=push) for s in SEEDS
    ]:
        r = chat(client, response_format=RF_SCHEMA, max_tokens=120, logprobs=True, **kw)
        text = message_of(r)["content"]
        jsonschema.validate(json.loads(text), SCHEMA)
        assert r["choices"][0]["finish_reason"] == "stop"
        entries = r["choices"][0]["logprobs"]["content"]
        assert len(entries) == r["usage"]["completion_tokens"] - 1  # the EOS is not listed
        assert not {e["token"] for e in entries} & specials
        assert b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8") == text
        assert not any(s in text for s in specials)


def test_integer_ranges_are_enforced_and_unenforceable_bounds_refused(client):
    # outlines' regex builder ignores minimum/maximum; a small integer range is enforced as an enum,
    # and bounds it cannot enforce are refused rather than silently dropped
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    rf = {"type": "json_schema", "json_schema": {"name": "digit", "schema": schema}}
    seen = set()
    for seed in SEEDS:
        r = client.post(
            CHAT, json={"messages": MSGS, "response_format": rf, "temperature": 1, "seed": seed, "max_tokens": 40}
        )
        assert r.status_code == 200, r.text
        value = json.loads(message_of(r.json())["content"])
        jsonschema.validate(value, schema)
        seen.add(value["n"])
    assert seen <= set(range(10))
    for bad in (
        {"type": "number", "minimum": 0},
        {"type": "integer", "minimum": 0},
        {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
    ):
        unbounded = {"type": "object", "properties": {"x": bad}, "required": ["x"]}
        r = client.post(
            CHAT,
            json={
                "messages": MSGS,
                "max_tokens": 5,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": unbounded}},
            },
        )
        err = assert_error(r, 400, code="invalid_schema")
        assert (
            err["param"].startswith("response_format")
            and "cannot enforce" in err["message"]
            and "unsupported" in err["message"]
        )


# ---------------------------------------------------------------------------------- 400s
def _tool(name, params=None):
    return {"type": "function", "function": {"name": name, "parameters": params or ADD}}


BAD = [
    (
        "schema-not-a-schema",
        dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}),
        "response_format.json_schema.schema",
        "invalid_schema",
    ),
    (
        "json_schema-without-name",
        dict(response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA}}),
        "response_format.json_schema.name",
        "missing_field",
    ),
    (
        "json_schema-missing",
        dict(response_format={"type": "json_schema"}),
        "response_format.json_schema",
        "missing_field",
    ),
    (
        "tgi-bad-value",
        dict(response_format={"type": "json", "value": {"type": "nope"}}),
        "response_format.value",
        "invalid_schema",
    ),
    ("unknown-rf-type", dict(response_format={"type": "yaml"}), "response_format.type", "invalid_value"),
    (
        "unresolvable-ref",
        dict(
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
                },
            }
        ),
        "response_format",
        "invalid_schema",
    ),
    (
        "tool_choice-unknown-tool",
        dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
        "tool_choice.function.name",
        "invalid_value",
    ),
    ("tool_choice-bad-string", dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice", "invalid_value"),
    ("tool_choice-without-tools", dict(tool_choice="required"), "tool_choice", "invalid_value"),
    ("empty-tools", dict(tools=[]), "tools", "invalid_value"),
    ("duplicate-tool-names", dict(tools=[_tool("add"), _tool("add")]), "tools[1].function.name", "invalid_value"),
    (
        "tool-params-invalid",
        dict(tools=[_tool("add", {"type": "object", "properties": {"a": {"type": "int"}}})]),
        "tools[0].function.parameters",
        "invalid_schema",
    ),
    (
        "tool-params-not-object",
        dict(tools=[_tool("add", "a string")]),
        "tools[0].function.parameters",
        "invalid_schema",
    ),
    ("bad-tool-name", dict(tools=[_tool("get weather!")]), "tools[0].function.name", "invalid_value"),
    ("tool-type", dict(tools=[{"type": "retrieval", "function": {"name": "add"}}]), "tools[0].type", "invalid_value"),
    (
        "response_format-with-tools",
        dict(tools=TOOLS, tool_choice="auto", response_format={"type": "json_object"}),
        "response_format",
        "invalid_value",
    ),
    (
        "tool-message-without-id",
        dict(messages=[{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]),
        "messages[1].tool_call_id",
        "missing_field",
    ),
]


@pytest.mark.parametrize("body,param,code", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_structured_requests(client, body, param, code):
    r = client.post(CHAT, json={"messages": MSGS, "max_tokens": 5, **body})
    err = assert_error(r, 400, param=param, code=code)
    assert err["type"] == "invalid_request_error"


def test_response_format_with_tool_choice_none_is_allowed(client):
    r = chat(client, tools=TOOLS, tool_choice="none", response_format=RF_SCHEMA, temperature=0, max_tokens=120)
    assert "tool_calls" not in message_of(r)
    jsonschema.validate(json.loads(message_of(r)["content"]), SCHEMA)


# ---------------------------------------------------------------------------------- tool calls
def test_required_tool_calls_validate(client):
    for kw in [dict(temperature=0)] + [dict(temperature=1, seed=s) for s in SEEDS]:
        calls = check_tool_reply(chat(client, tool_choice="required", **TOOL_KW, **kw))
        # greedy, this model repeats its call; the constraint ends the reply after at most
        # ConstraintCompiler.max_parallel_calls (8) calls instead of running to max_tokens
        assert len(calls) <= 8


@pytest.mark.parametrize("name", list(PARAMS))
def test_named_tool_choice(client, name):
    choice = {"type": "function", "function": {"name": name}}
    for kw in [dict(temperature=0), dict(temperature=1, seed=0)]:
        calls = check_tool_reply(chat(client, tool_choice=choice, **TOOL_KW, **kw), names=(name,))
        assert all(c["function"]["name"] == name for c in calls)


def test_parallel_tool_calls_false_gives_one_call(client):
    for kw in [dict(temperature=0)] + [dict(temperature=1, seed=s) for s in SEEDS]:
        calls = check_tool_reply(chat(client, tool_choice="required", parallel_tool_calls=False, **TOOL_KW, **kw))
        assert len(calls) == 1


def test_tool_without_parameters(client):
    """parameters may be omitted: the call's arguments are then a JSON object (OpenAI's default)."""
    tools = [{"type": "function", "function": {"name": "ping"}}]
    for kw in [dict(temperature=0), dict(temperature=1, seed=0)]:
        r = chat(client, tools=tools, tool_choice="required", parallel_tool_calls=False, max_tokens=200, **kw)
        (call,) = message_of(r)["tool_calls"]
        assert call["function"]["name"] == "ping" and call["id"].startswith("call_")
        assert isinstance(json.loads(call["function"]["arguments"]), dict)
        assert r["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_calls_cut_by_max_tokens(client):
    r = chat(client, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=12)
    assert r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 12


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1, seed=1)], ids=["greedy", "seed1"])
def test_streamed_tool_calls_match_non_stream(client, kw):
    body = dict(tool_choice="required", **TOOL_KW, **kw)
    r = chat(client, **body)
    full = check_tool_reply(r)
    assert message_of(r)["content"] is None
    chunks = stream_events(client, **body)
    calls = streamed_calls(chunks)
    check_calls(calls)
    assert same_calls(calls, full)
    assert finish_of(chunks) == "tool_calls"
    assert stream_text(chunks) == ""  # "required": nothing but calls


def test_openai_sdk_assembles_streamed_tool_calls(server, engine, client):
    from openai import OpenAI

    oc = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    body = dict(model=engine.model_name, messages=MSGS, tool_choice="required", temperature=1, seed=1, **TOOL_KW)
    full = check_tool_reply(chat(client, **body))
    with oc.chat.completions.stream(**body) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    got = [c.model_dump() for c in final.choices[0].message.tool_calls]
    check_calls(got)
    assert same_calls(got, full)


def test_tool_choice_none(client):
    with_tools = chat(client, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=30)
    plain = chat(client, temperature=0, max_tokens=30)
    assert "tool_calls" not in message_of(with_tools)
    assert with_tools["choices"][0]["finish_reason"] != "tool_calls"
    # the tools are not shown to the model either: same prompt, same greedy text
    assert with_tools["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert message_of(with_tools)["content"] == message_of(plain)["content"]
    chunks = stream_events(client, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=30)
    assert not any(c["choices"][0]["delta"].get("tool_calls") for c in chunks if c["choices"])


def test_tool_choice_auto_is_content_or_valid_calls(client):
    for kw in [dict(temperature=0)] + [dict(temperature=1, seed=s) for s in SEEDS]:
        r = chat(client, tool_choice="auto", tools=TOOLS, max_tokens=40, **kw)
        msg = message_of(r)
        if "tool_calls" in msg:
            check_tool_reply(r)
        else:
            assert isinstance(msg["content"], str)
            assert r["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    "kw",
    [dict(temperature=0), dict(temperature=1, seed=0), dict(temperature=1, seed=2)],
    ids=["greedy", "seed0", "seed2"],
)
def test_tool_choice_auto_trigger_forced_by_logit_bias(client, trigger_id, kw):
    """+100 on the "<tool_call>" token makes it the first token; from there the constraint must
    hold the call to the tools' schemas (the bias stays on, so one call: parallel_tool_calls false)."""
    body = dict(tool_choice="auto", parallel_tool_calls=False, logit_bias={str(trigger_id): 100}, **TOOL_KW, **kw)
    r = chat(client, **body)
    calls = check_tool_reply(r)
    assert len(calls) == 1 and message_of(r)["content"] is None
    chunks = stream_events(client, **body)
    assert same_calls(streamed_calls(chunks), calls)
    assert stream_text(chunks) == ""
    assert finish_of(chunks) == "tool_calls"


@pytest.mark.parametrize(
    "arguments", ['{"city": "Paris", "unit": "c"}', {"city": "Paris", "unit": "c"}], ids=["string", "object"]
)
@pytest.mark.parametrize("with_tools", [True, False])
def test_tool_result_round_trip(client, engine, arguments, with_tools):
    msgs = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_abc123", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc123", "content": "21 degrees and sunny"},
    ]
    extra = dict(tools=TOOLS, tool_choice="none") if with_tools else {}
    r = chat(client, messages=msgs, temperature=0, max_tokens=20, **extra)
    assert isinstance(message_of(r)["content"], str) and "tool_calls" not in message_of(r)
    assert r["choices"][0]["finish_reason"] in ("stop", "length")
    # the history reached the model: the call in the model's own format, and the result
    prompt = engine.tokenizer.decode(engine.render_prompt(msgs))
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>' in prompt
    assert "21 degrees and sunny" in prompt
    assert r["usage"]["prompt_tokens"] == len(engine.render_prompt(msgs))
