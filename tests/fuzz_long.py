"""Fuzzers for the request path, and a long run of them:

    .venv/bin/python tests/fuzz_long.py --examples 2000

tests/test_api_surface.py runs both briefly (this file's name keeps pytest from collecting it):

- validation: hypothesis bodies (random JSON; objects keyed like requests; valid requests with a
  few values mutated; bytes that are not JSON) through parse_body -> validate -> render_and_fit on
  a real tiny engine. Each must give a ValidatedRequest or an APIError with a 4xx status; any other
  exception is a bug (it would be a 500 on the wire).
- schema: schemathesis, driven by the server's own /openapi.json, against a live server on the
  tiny model: no 5xx, every status and body as documented, every streamed chunk a valid
  ChatCompletionChunk (CompletionChunk on /v1/completions).

A finding here becomes a regression test in tests/test_api_surface.py (and a fix in server/).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections import Counter
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _p in (str(_HERE), str(_HERE.parent)):  # run as a script: import like pytest does
    if _p not in sys.path:
        sys.path.insert(0, _p)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from server.errors import APIError  # noqa: E402
from server.validation import ValidatedRequest, parse_body, render_and_fit, validate  # noqa: E402

# ---------------------------------------------------------------------------------- validation layer
# strings that have found bugs in servers like this one: empty, NUL, a lone surrogate (valid JSON
# escape, invalid Unicode), non-ASCII digits that int() or str.isdigit() take, a long one
NASTY_STRINGS = [
    "",
    " ",
    "\x00",
    "\ud800",
    "a\udfffb",
    "٣",
    "²",
    "-1",
    "+5",
    " 5",
    "1e3",
    "NaN",
    "x" * 3000,
    "auto",
    "none",
    "required",
    "function",
    "text",
    "image_url",
    "json_schema",
    "json_object",
    "user",
]
NASTY = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    2**63,
    2**64,
    -(2**63) - 1,
    10**30,
    0.0,
    -0.0,
    1e-310,
    0.5,
    1e308,
    float("inf"),
    float("-inf"),
    float("nan"),
    [],
    {},
    [None],
    {"": None},
    [[]],
    [{}],
    {"type": "object"},
    {"type": "text", "text": ""},
    *NASTY_STRINGS,
]
# every field name the wire models know, so random objects hit real fields
KEYS = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
    "top_logprobs",
    "stream",
    "stream_options",
    "n",
    "tools",
    "tool_choice",
    "tool_prompt",
    "parallel_tool_calls",
    "response_format",
    "logit_bias",
    "ignore_eos",
    "min_tokens",
    "role",
    "content",
    "name",
    "tool_calls",
    "tool_call_id",
    "type",
    "text",
    "image_url",
    "url",
    "detail",
    "function",
    "arguments",
    "description",
    "parameters",
    "strict",
    "id",
    "include_usage",
    "json_schema",
    "schema",
    "value",
]

TEXT = st.text(max_size=12) | st.sampled_from(NASTY_STRINGS)
LEAF = st.none() | st.booleans() | st.integers() | st.floats() | TEXT | st.sampled_from(NASTY)
JSON = st.recursive(
    LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | TEXT, inner, max_size=4),
    max_leaves=16,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
VALID = [
    {"messages": [{"role": "user", "content": "Hello"}]},
    {
        "model": "tgi",
        "max_tokens": 8,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 1,
        "stop": ["\n\n", "END"],
        "frequency_penalty": 0.1,
        "presence_penalty": -0.1,
        "logprobs": True,
        "top_logprobs": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": 1,
        "logit_bias": {"5": 1.5},
        "min_tokens": 1,
        "ignore_eos": False,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": ""}]},
            {"role": "assistant", "content": "Hi."},
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "How are you?", "name": "ann"},
        ],
    },
    {
        "max_completion_tokens": 4,
        "tools": [WEATHER],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "user", "content": "And tomorrow?"},
        ],
    },
    {
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "messages": [{"role": "user", "content": "Weather in Rome?"}],
    },
    {
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "answer",
                "schema": {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]},
            },
        },
        "messages": [{"role": "user", "content": "Reply in JSON"}],
    },
    {"response_format": {"type": "json_object"}, "stop": "}", "messages": [{"role": "user", "content": "JSON"}]},
    {
        "response_format": {"type": "json", "value": {"type": "object"}},  # TGI's shape
        "messages": [{"role": "user", "content": "JSON"}],
    },
]


def _slots(obj):
    """(container, key) for every value inside obj, at any depth."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in list(items):
        yield obj, key
        yield from _slots(value)


def _containers(obj):
    if isinstance(obj, (dict, list)):
        yield obj
        for value in obj.values() if isinstance(obj, dict) else obj:
            yield from _containers(value)


@st.composite
def mutated(draw):
    """A valid request with 1-3 random edits: a value replaced (by random JSON or a known-nasty
    value), deleted, wrapped in a list, or a key or list item added."""
    body = copy.deepcopy(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["replace", "nasty", "delete", "wrap", "add"]))
        if op == "add":
            target = draw(st.sampled_from(list(_containers(body))))
            if isinstance(target, dict):
                target[draw(st.sampled_from(KEYS) | TEXT)] = draw(JSON | st.sampled_from(NASTY))
            else:
                target.insert(draw(st.integers(0, len(target))), draw(JSON | st.sampled_from(NASTY)))
            continue
        slots = list(_slots(body))
        if not slots:
            break
        container, key = draw(st.sampled_from(slots))
        if op == "replace":
            container[key] = draw(JSON)
        elif op == "nasty":
            container[key] = draw(st.sampled_from(NASTY))
        elif op == "delete":
            del container[key]
        else:
            container[key] = [container[key]]
    return body


def _encode(value, ascii_only: bool) -> bytes:
    # ensure_ascii=False with a lone surrogate gives bytes that are not UTF-8: a case of its own
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def _json_bytes(values):
    return st.builds(_encode, values, st.booleans())


def bodies():
    """Raw request bodies; the mutated valid requests get the most weight (they get past parsing)."""
    return st.one_of(
        _json_bytes(JSON),
        _json_bytes(st.dictionaries(st.sampled_from(KEYS), JSON, max_size=6)),
        _json_bytes(mutated()),
        _json_bytes(mutated()),
        _json_bytes(mutated()),
        st.binary(max_size=40),
    )


def validation_outcome(raw: bytes, engine) -> str:
    """Run raw through the whole validation layer: "ok", or the APIError's status and code.

    Any other exception propagates: that is what the fuzzer looks for (on the wire, a 500)."""
    try:
        v = validate(parse_body(raw), vocab_size=engine.vocab_size)
        render_and_fit(v, engine)
    except APIError as exc:
        assert 400 <= exc.status < 500, (exc.status, exc.message)
        body = exc.body()["error"]
        assert isinstance(body["message"], str) and body["message"]
        assert body["param"] is None or isinstance(body["param"], str)
        return f"{exc.status} {exc.code}"
    # what the engine receives: checked values, a prompt that fits
    assert isinstance(v, ValidatedRequest)
    p, n = v.params, len(v.prompt_ids)
    assert 0 < n < engine.max_model_len and all(0 <= t < engine.vocab_size for t in v.prompt_ids)
    assert p.max_tokens is None or 1 <= p.max_tokens <= engine.max_model_len - n
    assert 0.0 <= p.temperature <= 2.0 and 0.0 < p.top_p <= 1.0 and 0 <= p.top_logprobs <= 5
    assert all(isinstance(s, str) and s for s in p.stop)
    return "ok"


def run_validation_fuzz(engine, *, examples: int, derandomize: bool = True) -> Counter:
    """The validation-layer property over `examples` bodies; returns how often each outcome came."""
    outcomes: Counter = Counter()

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=derandomize,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(raw=bodies())
    def prop(raw):
        outcomes[validation_outcome(raw, engine)] += 1

    prop()
    return outcomes


# ---------------------------------------------------------------------------------- schemathesis
OPERATIONS = [
    "GET /health",
    "GET /v1/models",
    "GET /v1/models/{model_id}",
    "POST /v1/chat/completions",
    "POST /v1/completions",
]
CHUNKS = {"/v1/chat/completions": "ChatCompletionChunk", "/v1/completions": "CompletionChunk"}  # streamed bodies
ROLES = ["system", "developer", "user", "assistant"]
MAX_TOKENS = 4  # generation stays cheap: the point is the request handling, not the text


def load_schema(base_url: str):
    import schemathesis

    return schemathesis.openapi.from_url(base_url + "/openapi.json")


def _make_cheap(body: dict) -> None:
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
            body[key] = MAX_TOKENS
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:  # null: no limit
        body["max_tokens"] = MAX_TOKENS


def _steer(body: dict, draw) -> None:
    """Nudge a schema-generated body towards one the server accepts. Straight from the schema,
    nearly every body is a 400 (any string is a role, an empty message list fits the schema, a
    random model name is a 404), so generation and the 200 bodies would go untested."""
    if draw(st.booleans()):
        body.pop("model", None)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        body["messages"] = messages = [{"role": "user", "content": "hi"}]
    for m in messages:
        if not isinstance(m, dict):
            continue
        if m.get("role") not in ROLES:
            m["role"] = draw(st.sampled_from(ROLES))
        if isinstance(m.get("content"), list):  # a text-only model: image parts are a 400
            m["content"] = [p for p in m["content"] if isinstance(p, dict) and p.get("type") == "text"]
        if not m.get("content"):
            m["content"] = draw(TEXT)
    if not body.get("tools"):
        body.pop("tool_choice", None)
    if draw(st.booleans()):  # optional fields are rarely drawn: without this, few streams
        body["stream"] = True
    if not body.get("stream"):
        body.pop("stream_options", None)


def _steer_completion(body: dict, draw) -> None:
    """_steer for /v1/completions: a short prompt, a few choices, no refused fields (mostly)."""
    if draw(st.booleans()):
        body.pop("model", None)
    if draw(st.booleans()):
        body["prompt"] = draw(
            TEXT.filter(bool) | st.lists(st.sampled_from(["Hi", "Hello there", "1 2 3"]), min_size=1, max_size=3)
        )
    for key in ("suffix", "best_of"):
        body.pop(key, None)
    if not isinstance(body.get("n"), int) or not 1 <= body["n"] <= 3:
        body.pop("n", None)
    if draw(st.booleans()):
        body["stream"] = True
    if not body.get("stream"):
        body.pop("stream_options", None)


def doc_validator(doc: dict, name: str):
    """A validator for components/schemas/<name> of an OpenAPI 3.1 document (its refs resolve in doc)."""
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    registry = Registry().with_resource("urn:openapi", Resource(contents=doc, specification=DRAFT202012))
    return Draft202012Validator({"$ref": f"urn:openapi#/components/schemas/{name}"}, registry=registry)


def check_event_stream(doc: dict, text: str, *, complete: bool = True, chunk_model: str = "ChatCompletionChunk") -> int:
    """A streamed 200: `data: ` lines, each a chunk_model as the document describes it (an
    ErrorResponse only as the last before [DONE]), ending in `data: [DONE]` unless the client
    stopped reading early (complete=False). Returns the chunk count."""
    chunk, error = doc_validator(doc, chunk_model), doc_validator(doc, "ErrorResponse")
    lines = [line for line in text.split("\n") if line]
    assert lines and all(line.startswith("data: ") for line in lines), lines[:3]
    payloads = [line[len("data: ") :] for line in lines]
    if complete or payloads[-1] == "[DONE]":
        assert payloads[-1] == "[DONE]", payloads[-3:]
        payloads.pop()
    assert "[DONE]" not in payloads, payloads[-3:]
    events = [json.loads(p) for p in payloads]
    for i, event in enumerate(events):
        if "error" in event:
            assert i == len(events) - 1, "an error event must be the last before [DONE]"
            error.validate(event)
        else:
            chunk.validate(event)
    return len(events)


def run_schema_fuzz(
    schema,
    label: str,
    base_url: str,
    *,
    model_name: str,
    examples: int,
    derandomize: bool = True,
    negative: bool = False,
) -> Counter:
    """Fuzz one operation with bodies and parameters schemathesis draws from the document.

    Positive (schema-valid) data: three of four examples are steered towards requests the server
    accepts (see _steer). Negative data (each breaks the schema somewhere) must all be refused
    with a 4xx. Every body asks for at most MAX_TOKENS tokens. Returns how often each status came
    ("200 stream" for an event stream)."""
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    method, path = label.split(" ", 1)
    operation = schema[path][method]
    doc = schema.raw_schema
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    if negative:
        checks.append(negative_data_rejection)
    mode = GenerationMode.NEGATIVE if negative else GenerationMode.POSITIVE
    statuses: Counter = Counter()

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=derandomize,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def fuzz(case, data):
        steer = not negative and data.draw(st.sampled_from([True, True, True, False]))  # hypothesis favours the first
        if isinstance(case.body, dict):
            if steer:
                (_steer_completion if path == "/v1/completions" else _steer)(case.body, data.draw)
            _make_cheap(case.body)
        if case.path_parameters and steer and data.draw(st.booleans()):
            case.path_parameters["model_id"] = model_name
        response = case.call(base_url=base_url, timeout=120)
        case.validate_response(response, checks=checks)
        streamed = response.headers.get("content-type", [""])[0].startswith("text/event-stream")
        if response.status_code == 200 and streamed:
            # schemathesis reads at most 20 events of a stream
            check_event_stream(
                doc, response.content.decode(), complete=not response.stream_cut_short, chunk_model=CHUNKS[path]
            )
        statuses[f"{response.status_code} stream" if streamed else str(response.status_code)] += 1

    fuzz()
    return statuses


# ---------------------------------------------------------------------------------- long run
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=2000, help="examples per fuzzer and per operation")
    ap.add_argument("--only", choices=["validation", "schema"], help="run one of the two fuzzers")
    args = ap.parse_args(argv)

    import tempfile

    import torch
    from conftest import make_engine, serve_engine
    from tiny_models import build_tiny_llama

    torch.set_num_threads(1)
    engine = make_engine(build_tiny_llama(Path(tempfile.mkdtemp(prefix="chatserve-fuzz-"))))
    try:
        if args.only in (None, "validation"):
            t0 = time.perf_counter()
            outcomes = run_validation_fuzz(engine, examples=args.examples, derandomize=False)
            print(f"validation: {sum(outcomes.values())} bodies in {time.perf_counter() - t0:.1f}s", flush=True)
            for outcome, n in outcomes.most_common():
                print(f"  {n:6d}  {outcome}", flush=True)
        if args.only in (None, "schema"):
            with serve_engine(engine) as srv:
                schema = load_schema(srv.base_url)
                runs = [(label, False) for label in OPERATIONS] + [
                    ("POST /v1/chat/completions", True),
                    ("POST /v1/completions", True),
                ]
                for label, negative in runs:
                    t0 = time.perf_counter()
                    statuses = run_schema_fuzz(
                        schema,
                        label,
                        srv.base_url,
                        model_name=engine.model_name,
                        examples=args.examples,
                        derandomize=False,
                        negative=negative,
                    )
                    print(
                        f"schema {label}{' (negative)' if negative else ''}: {dict(sorted(statuses.items()))} "
                        f"in {time.perf_counter() - t0:.1f}s",
                        flush=True,
                    )
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
