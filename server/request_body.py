"""A request body -> the wire model (server/protocol.py), every parse problem a 400 naming the field.

Shared by chat and plain completions; the range and cross-field checks that follow are in
server/validation.py (chat) and server/completion_validation.py.
"""

from __future__ import annotations

import json

from pydantic import ValidationError

from .errors import bad_request
from .protocol import ChatCompletionRequest, CompletionRequest


def _loc(err: dict) -> str:
    parts = []
    for p in err.get("loc", ()):
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif (
            p in ("str", "list[str]", "int", "float", "bool")
            or "[" in str(p)
            or p.startswith(("function-", "tagged-union"))
        ):
            continue  # pydantic's union-branch labels, not field names
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or None


# fields whose type is a union: one message naming every shape they take, not one branch's complaint
_SHAPES = {"prompt": "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"}


def parse_body(raw: bytes, model: type[ChatCompletionRequest | CompletionRequest] = ChatCompletionRequest):
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        # the deepest error is the most specific one (e.g. a bad content part, not "expected a string")
        err = max(exc.errors(), key=lambda e: len(e.get("loc", ())))
        param = _loc(err)
        if err["type"] == "missing":
            msg = f"missing required field: {param}"
        elif param is not None and param.split("[")[0] in _SHAPES:
            param = param.split("[")[0]
            msg = _SHAPES[param]
        elif err["type"] == "union_tag_invalid" or err["type"] == "union_tag_not_found":
            msg = f"{param}: unknown content part type (expected 'text' or 'image_url')"
        else:
            msg = f"{param}: {err['msg']}"
        raise bad_request(
            msg, param=param, code="invalid_type" if err["type"] != "missing" else "missing_field"
        ) from None
