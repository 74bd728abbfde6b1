"""The API's surface, through HTTP on the tiny model: what /openapi.json promises and that the
server keeps it (checked directly, then fuzzed with schemathesis), 405s that name the allowed
methods, `content: []` refused, a queue timeout's Retry-After, the body read timeout (408), and a
hypothesis property of the validation layer. The fuzzers live in tests/fuzz_long.py, which also
runs them for longer."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from conftest import make_engine, serve_engine
from fuzz_long import OPERATIONS, check_event_stream, doc_validator, load_schema, run_schema_fuzz, run_validation_fuzz
from test_api import CHAT, MSGS, assert_error, chat, content_of, next_data, slowed
from test_cli import settings

REF = "#/components/schemas/"


def allowed(r: httpx.Response) -> set[str]:
    return {m.strip() for m in r.headers["Allow"].split(",")}


def resolve(doc: dict, schema: dict) -> dict:
    while "$ref" in schema:
        assert schema["$ref"].startswith(REF), schema
        schema = doc["components"]["schemas"][schema["$ref"][len(REF) :]]
    return schema


def refs_in(obj) -> list[str]:
    if isinstance(obj, dict):
        own = [obj["$ref"]] if isinstance(obj.get("$ref"), str) else []
        return own + [r for v in obj.values() for r in refs_in(v)]
    if isinstance(obj, list):
        return [r for v in obj for r in refs_in(v)]
    return []


@pytest.fixture(scope="module")
def doc(tiny_server) -> dict:
    r = httpx.get(tiny_server.base_url + "/openapi.json", timeout=60)
    assert r.status_code == 200
    return r.json()


# ---------------------------------------------------------------------------------- 405
@pytest.mark.parametrize(
    "method,path,allow",
    [
        ("GET", CHAT, {"POST"}),
        ("PUT", CHAT, {"POST"}),
        ("POST", "/v1/models", {"GET"}),
        ("DELETE", "/v1/models/some-model", {"GET"}),
        ("POST", "/health", {"GET"}),
    ],
)
def test_405_names_the_allowed_methods(client, method, path, allow):
    r = client.request(method, path)
    err = assert_error(r, 405, code="method_not_allowed", contains=(method, path))
    assert err["type"] == "invalid_request_error"
    assert allowed(r) == allow


# ---------------------------------------------------------------------------------- /openapi.json
def test_openapi_chat_request_body_is_the_wire_model(doc):
    from server.protocol import ChatCompletionRequest

    body = doc["paths"][CHAT]["post"]["requestBody"]
    assert body["required"] is True and list(body["content"]) == ["application/json"]
    schema = resolve(doc, body["content"]["application/json"]["schema"])
    assert schema["title"] == "ChatCompletionRequest" and schema["required"] == ["messages"]
    assert {"string", "null"} == {s["type"] for s in schema["properties"]["model"]["anyOf"]}
    message = resolve(doc, schema["properties"]["messages"]["items"])
    assert message["title"] == "Message" and {"role", "content", "tool_calls"} <= set(message["properties"])
    assert message["required"] == ["role"]
    # the same schema pydantic gives, with its $defs moved into components/schemas
    expected = ChatCompletionRequest.model_json_schema(ref_template=REF + "{model}")
    for name, sub in expected.pop("$defs").items():
        assert doc["components"]["schemas"][name] == sub, name
    assert schema == expected


def test_openapi_responses_name_their_models(doc):
    chat_op = doc["paths"][CHAT]["post"]
    responses = chat_op["responses"]
    assert set(responses) == {"200", "400", "401", "404", "408", "413", "429", "500", "503"}
    ok = responses["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": REF + "ChatCompletion"}
    event = ok["text/event-stream"]["schema"]
    data = event["properties"]["data"]["anyOf"]
    assert {"const": "[DONE]"} in data
    assert {"$ref": REF + "ChatCompletionChunk"} in data[1]["contentSchema"]["anyOf"]
    for status in ("400", "401", "404", "408", "413", "429", "500", "503"):
        assert responses[status]["content"]["application/json"]["schema"] == {"$ref": REF + "ErrorResponse"}, status
    assert "Retry-After" in responses["429"]["headers"] and "Retry-After" in responses["503"]["headers"]
    assert set(resolve(doc, {"$ref": REF + "ErrorResponse"})["properties"]) == {"error"}
    assert set(resolve(doc, {"$ref": REF + "ErrorBody"})["properties"]) == {"message", "type", "param", "code"}

    def schema_of(path, status):
        return doc["paths"][path]["get"]["responses"][status]["content"]["application/json"]["schema"]

    assert schema_of("/v1/models", "200") == {"$ref": REF + "ModelList"}
    assert schema_of("/v1/models/{model_id}", "200") == {"$ref": REF + "ModelCard"}
    assert schema_of("/v1/models/{model_id}", "404") == {"$ref": REF + "ErrorResponse"}
    assert schema_of("/health", "200") == schema_of("/health", "503") == {"$ref": REF + "Health"}
    # the server never answers 422 (FastAPI would document one for the path parameter)
    assert all("422" not in op["responses"] for ops in doc["paths"].values() for op in ops.values())


def test_openapi_document_is_valid_and_every_ref_resolves(doc):
    from openapi_spec_validator import validate

    validate(doc)
    refs = refs_in(doc)
    assert REF + "Message" in refs and REF + "ChatCompletionChunk" in refs
    for ref in refs:
        assert ref.startswith(REF) and ref[len(REF) :] in doc["components"]["schemas"], ref


def test_real_responses_match_the_documented_schemas(client, doc):
    """The schemas describe what the server really sends (schemathesis below checks it wider)."""
    body = chat(client, max_tokens=3, logprobs=True, top_logprobs=2)
    doc_validator(doc, "ChatCompletion").validate(body)
    error = client.post(CHAT, json={"messages": MSGS, "temperature": 9})
    doc_validator(doc, "ErrorResponse").validate(error.json())
    doc_validator(doc, "ModelList").validate(client.get("/v1/models").json())
    doc_validator(doc, "Health").validate(client.get("/health").json())
    with client.stream(
        "POST",
        CHAT,
        json={"messages": MSGS, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        assert r.status_code == 200
        text = r.read().decode()
    assert check_event_stream(doc, text) >= 3  # role chunk, >= 1 text chunk, usage chunk
    # and the stream check notices a chunk that breaks the schema
    with pytest.raises(Exception, match="chat.completion.chunk"):
        check_event_stream(doc, text.replace('"object":"chat.completion.chunk"', '"object":"list"', 1))


def test_openapi_declares_bearer_auth_when_a_key_is_required(tiny_engine):
    with serve_engine(tiny_engine, api_key="sekret") as srv:
        doc = httpx.get(srv.base_url + "/openapi.json", timeout=60).json()  # readable without the key
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert doc["paths"][CHAT]["post"]["security"] == [{"bearer": []}]
    assert doc["paths"]["/v1/models"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in doc["paths"]["/health"]["get"]


# ---------------------------------------------------------------------------------- content: []
@pytest.mark.parametrize(
    "messages,param",
    [
        ([{"role": "user", "content": []}], "messages[0].content"),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": []}], "messages[1].content"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": []}], "messages[1].content"),
    ],
)
def test_an_empty_content_list_is_refused(client, messages, param):
    err = assert_error(client.post(CHAT, json={"messages": messages}), 400, param=param, code="invalid_value")
    assert "empty" in err["message"] and param in err["message"]


def test_content_of_empty_text_parts_is_accepted(client):
    # one empty part renders like an empty string (several parts are joined with newlines)
    part = chat(
        client, temperature=0, max_tokens=4, messages=[{"role": "user", "content": [{"type": "text", "text": ""}]}]
    )
    plain = chat(client, temperature=0, max_tokens=4, messages=[{"role": "user", "content": ""}])
    assert content_of(part) == content_of(plain)
    assert part["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    two = chat(client, max_tokens=2, messages=[{"role": "user", "content": [{"type": "text", "text": ""}] * 2}])
    assert two["choices"][0]["finish_reason"] in ("stop", "length")


# ---------------------------------------------------------------------------------- Retry-After
def test_queue_timeout_retry_after_follows_the_configured_timeout(tiny_model_dir):
    # 1.5 s in the queue: Retry-After is the timeout rounded up to whole seconds (not a fixed 5)
    engine = slowed(make_engine(tiny_model_dir, max_running=1, queue_timeout=1.5))  # the blocker stays busy
    try:
        with serve_engine(engine) as srv, httpx.Client(base_url=srv.base_url, timeout=60) as c:
            long = {"messages": MSGS, "max_tokens": 200, "min_tokens": 200, "stream": True}
            with c.stream("POST", CHAT, json=long) as running:
                assert running.status_code == 200
                running_lines = running.iter_lines()  # keep a reference: a dropped iterator closes the stream
                next_data(running_lines)
                with httpx.Client(base_url=srv.base_url, timeout=60) as c2:
                    r = c2.post(CHAT, json={"messages": MSGS, "max_tokens": 2})
                assert_error(r, 503, code="queue_timeout")
                assert r.headers["Retry-After"] == "2"
                assert next_data(running_lines)  # the blocker was still running all along
    finally:
        engine.stop()


# ---------------------------------------------------------------------------------- body read timeout
def read_http_response(sock: socket.socket, trickle: bytes) -> tuple[bytes, int]:
    """Send `trickle` one byte per 0.1 s until the server answers; return (everything the server
    sent before closing the connection, how many bytes of `trickle` went out)."""
    sock.settimeout(0.1)
    received, sent = b"", 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if sent < len(trickle) and not received:
            sock.sendall(trickle[sent : sent + 1])
            sent += 1
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        if not data:  # the server closed the connection
            return received, sent
        received += data
    raise AssertionError(f"no complete answer in 60 s; got {received!r}")


@pytest.mark.parametrize(
    "trickle",
    [b'{"messages": [{"role": "user", "content": "' + b"x" * 200 + b'"}]}', b""],
    ids=["one_byte_at_a_time", "nothing_after_the_headers"],
)
def test_a_slow_body_gets_a_408_and_the_connection_is_closed(tiny_engine, trickle):
    length = len(trickle) or 100
    with serve_engine(tiny_engine, body_read_timeout=0.5) as srv:
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.sendall(
                f"POST {CHAT} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                f"Content-Length: {length}\r\n\r\n".encode()
            )
            raw, sent = read_http_response(sock, trickle)
        assert sent < length  # the answer came while the body was still arriving
        head, _, body = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode().split("\r\n")
        assert status_line.startswith("HTTP/1.1 408 "), status_line
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        assert headers["content-type"] == "application/json" and headers["connection"] == "close"
        err = json.loads(body)["error"]
        assert err["code"] == "request_timeout" and err["type"] == "invalid_request_error" and "0.5" in err["message"]
        # the same server still serves a request that sends its body at once
        with httpx.Client(base_url=srv.base_url, timeout=60) as c:
            assert chat(c, max_tokens=2)["choices"][0]["message"]["role"] == "assistant"


def test_body_read_timeout_setting():
    from server.app import BODY_READ_TIMEOUT

    assert settings([])["body_read_timeout"] == BODY_READ_TIMEOUT == 30.0
    assert settings(["--body-read-timeout", "2.5"])["body_read_timeout"] == 2.5


# ---------------------------------------------------------------------------------- fuzzing
def test_validation_layer_gives_a_request_or_a_4xx_for_any_body(tiny_engine):
    """parse_body -> validate -> render_and_fit on 300 hypothesis bodies: a ValidatedRequest or an
    APIError with a 4xx, never another exception (fuzz_long.validation_outcome)."""
    outcomes = run_validation_fuzz(tiny_engine, examples=300)
    assert sum(outcomes.values()) >= 300
    # the bodies reach every layer: accepted ones, and refusals of several kinds
    assert outcomes["ok"] >= 5, outcomes
    assert {"400 invalid_json", "400 invalid_type", "400 missing_field", "400 invalid_value"} <= set(outcomes), outcomes


@pytest.fixture(scope="module")
def api_schema(tiny_server):
    return load_schema(tiny_server.base_url)


@pytest.mark.parametrize("label", OPERATIONS)
def test_schemathesis_finds_no_5xx_and_no_undocumented_response(api_schema, tiny_server, tiny_engine, label):
    statuses = run_schema_fuzz(api_schema, label, tiny_server.base_url, model_name=tiny_engine.model_name, examples=30)
    assert not any(s.startswith("5") for s in statuses), statuses
    if label == "POST /v1/chat/completions":  # steering gets generated requests past validation
        # (which of the 200s stream depends on the generated data, which moves with the schema: any mix will do)
        assert statuses["200"] + statuses["200 stream"] >= 3 and statuses["400"] >= 3, statuses
    elif label == "GET /v1/models/{model_id}":
        assert statuses["200"] >= 1 and statuses["404"] >= 1, statuses


def test_schemathesis_bodies_that_break_the_schema_are_all_refused(api_schema, tiny_server, tiny_engine):
    statuses = run_schema_fuzz(
        api_schema,
        "POST /v1/chat/completions",
        tiny_server.base_url,
        model_name=tiny_engine.model_name,
        examples=30,
        negative=True,
    )
    assert set(statuses) == {"400"}, statuses


# ---------------------------------------------------------------------------------- findings
def test_json_schema_of_an_empty_schema_is_constrained_as_a_json_object(client):
    """{} allows any JSON value; outlines took over the 10 s compile timeout for it, so a valid
    request got a 400 "schema too complex". A JSON object satisfies {}: it now decodes as json_object."""
    any_json = chat(
        client,
        temperature=0,
        max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "anything", "schema": {}}},
    )
    obj = chat(client, temperature=0, max_tokens=120, response_format={"type": "json_object"})
    assert isinstance(json.loads(content_of(any_json)), dict)
    assert content_of(any_json) == content_of(obj)
