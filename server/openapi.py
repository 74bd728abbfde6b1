"""The OpenAPI description of the routes, generated from the wire models in server/protocol.py.

The chat and completion routes read their raw body themselves (to enforce the size limit and the
read timeout while the bytes arrive, and to word their own JSON errors), so FastAPI sees no body
parameter there and would document none. These helpers declare the request body and every
response by hand, from the same pydantic models the routes parse and serialize with, so
/openapi.json tells clients (and fuzzers) what each route really takes and gives.
"""

from __future__ import annotations

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .protocol import ChatCompletionChunk, ChatCompletionRequest, CompletionChunk, CompletionRequest, ErrorResponse

REF_TEMPLATE = "#/components/schemas/{model}"

_ERRORS = {
    400: "Invalid request: `error.param` names the field at fault.",
    401: "Missing or wrong API key (only when the server was started with one).",
    404: "Unknown model.",
    408: "The request body did not arrive within the server's body read timeout.",
    413: "The request body is larger than the server accepts.",
    429: "The server is at capacity; retry after `Retry-After` seconds.",
    500: "An internal error (a bug).",
    503: "The engine is not running, or the request waited too long in the queue; retry after `Retry-After` seconds.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}


def _schemas() -> tuple[dict[str, dict], dict[str, dict]]:
    """({model name: {"$ref": ...}}, components) for the models FastAPI cannot see on its own.

    One pydantic pass over all of them, so shared sub-models get one name, and refs point into
    components/schemas (pydantic's default, "#/$defs/...", does not resolve in an OpenAPI document).
    """
    refs, defs = models_json_schema(
        [
            (ChatCompletionRequest, "validation"),
            (ChatCompletionChunk, "serialization"),
            (CompletionRequest, "validation"),
            (CompletionChunk, "serialization"),
            (ErrorResponse, "serialization"),
        ],
        ref_template=REF_TEMPLATE,
    )
    return {model.__name__: ref for (model, _mode), ref in refs.items()}, defs.get("$defs", {})


_REFS, COMPONENTS = _schemas()


def errors(*statuses: int) -> dict:
    """`responses=` entries for error statuses: OpenAI's error shape (ErrorResponse)."""
    out = {}
    for s in statuses:
        out[s] = {"model": ErrorResponse, "description": _ERRORS[s]}
        if s in (429, 503):
            out[s]["headers"] = _RETRY_AFTER
    return out


def ok(model: type[BaseModel], description: str) -> dict:
    return {200: {"model": model, "description": description}}


def _request_body(model: str) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _REFS[model]}}}}


CHAT_REQUEST_BODY = _request_body("ChatCompletionRequest")
COMPLETION_REQUEST_BODY = _request_body("CompletionRequest")


def _event_stream(chunk: str) -> dict:
    """One server-sent event (OpenAPI before 3.2 has no itemSchema; tools read an event stream's
    `schema` as the schema of each event, which 3.2 made official): `data` holds a chunk as JSON, or
    an ErrorResponse if generation fails after the stream began, and the last event is [DONE]."""
    return {
        "text/event-stream": {
            "schema": {
                "type": "object",
                "description": f"With `stream: true`, each server-sent event: one {chunk} as JSON in `data` "
                "(or an ErrorResponse if generation fails after the stream began); the last event's "
                "`data` is `[DONE]`.",
                "properties": {
                    "data": {
                        "anyOf": [
                            {"const": "[DONE]"},
                            {
                                "type": "string",
                                "contentMediaType": "application/json",
                                "contentSchema": {"anyOf": [_REFS[chunk], _REFS["ErrorResponse"]]},
                            },
                        ]
                    }
                },
                "required": ["data"],
            }
        }
    }


CHAT_STREAM = _event_stream("ChatCompletionChunk")
COMPLETION_STREAM = _event_stream("CompletionChunk")


def install(app, *, bearer_auth: bool = False) -> None:
    """Make app.openapi() add COMPONENTS (what the hand-declared bodies refer to) to FastAPI's
    document and, when the server needs an API key, say so on the /v1/ operations."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = build()
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in COMPONENTS.items():
                schemas.setdefault(name, schema)  # FastAPI's own copy of a shared model wins
            # FastAPI documents a 422 wherever a route has parameters; the only one here is a path
            # string, which always validates, so this server never answers 422
            for ops in doc.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            if bearer_auth:
                doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, ops in doc.get("paths", {}).items():
                    if path.startswith("/v1/"):
                        for op in ops.values():
                            op["security"] = [{"bearer": []}]
        return app.openapi_schema

    app.openapi = openapi
