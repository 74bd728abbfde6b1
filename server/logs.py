"""Request ids, the access log line, and log formats.

Every HTTP request gets an id: the client's `X-Request-Id` when it sends a usable one (1-200
visible ASCII characters), else a new one (32 hex digits). The response carries it back in
`X-Request-Id` (streams too: it is a header, sent before the first chunk), every log line written
while the request is handled carries it (the JSON format's `request_id`), and the request's access
line names it.

The access line is one line per request, written by ``RequestLogMiddleware`` when the response's
last byte is sent (or the client left): method, path, status, latency in seconds, request id, and
for generations the model, the completion id, stream, token counts and finish reasons, which the
route adds with ``note()``. Text: ``POST /v1/chat/completions 200 latency=0.153s request_id=...
model=... prompt_tokens=9 ...``; JSON (``--log-format json``): the same fields as keys of one object.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import time
import uuid
from datetime import datetime, timezone

access_log = logging.getLogger("chatserve.access")

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("chatserve_request_id", default=None)
HEADER = "X-Request-Id"
_USABLE_ID = re.compile(r"[\x21-\x7e]{1,200}")
_STATE_KEY = "chatserve"  # this server's entry in the ASGI scope's per-request state


def request_info(scope) -> dict:
    """The request's own dict (in the scope's per-request state, which Starlette's request.state
    also uses): the routes write the model and generation fields, the middlewares read them."""
    return scope.setdefault("state", {}).setdefault(_STATE_KEY, {})


def note(request, **fields) -> None:
    """Add fields to the request's access line (and the model label of its metrics)."""
    request_info(request.scope).update(fields)


def _incoming_id(scope) -> str:
    for key, value in scope.get("headers", ()):
        if key == b"x-request-id":
            text = value.decode("latin-1").strip()
            if _USABLE_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


# fields the access line lists after the method, path and status, in this order
_ORDER = (
    "latency",
    "request_id",
    "model",
    "id",
    "stream",
    "choices",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "finish",
    "client",
)


def _text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.3f}s"
    return str(v)


class RequestLogMiddleware:
    """Pure ASGI (so client disconnects still reach the routes), outermost: gives the request its
    id, puts it on the response and writes the access line."""

    def __init__(self, app, default_model: str | None = None):
        self.app = app
        self.default_model = default_model  # with one model: the model of /v1 requests no route resolved

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _incoming_id(scope)
        info = request_info(scope)
        info["request_id"] = rid
        token = REQUEST_ID.set(rid)
        start = time.perf_counter()
        state = {"status": None, "logged": False}

        def write_line():
            if state["logged"]:
                return
            state["logged"] = True
            fields = {
                "method": scope["method"],
                "path": scope["path"],
                "status": state["status"] if state["status"] is not None else 499,
                "latency": round(time.perf_counter() - start, 4),
            }
            if scope.get("client"):
                fields["client"] = scope["client"][0]
            if "model" not in info and self.default_model and scope["path"].startswith("/v1/"):
                fields["model"] = self.default_model
            fields.update(info)
            fields = {
                k: fields[k]
                for k in (
                    "method",
                    "path",
                    "status",
                    *_ORDER,
                    *sorted(set(fields) - {"method", "path", "status", *_ORDER}),
                )
                if k in fields
            }
            rest = " ".join(f"{k}={_text(fields[k])}" for k in fields if k not in ("method", "path", "status"))
            access_log.info(
                "%s %s %s %s", fields["method"], fields["path"], fields["status"], rest, extra={"fields": fields}
            )

        async def sending(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode("latin-1"))]}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                write_line()

        try:
            await self.app(scope, receive, sending)
        except Exception:
            if state["status"] is None:
                state["status"] = 500  # Starlette's outermost handler answers it
            raise
        finally:
            write_line()  # a client that left mid-stream (or an error before any response)
            REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    """Stamps every record with the id of the request being handled (None outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the request id when
    the line was written while handling one, a record's `fields` (the access line's) as keys of
    their own, and the traceback as `exc_info` (one string: JSON escapes its newlines)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or REQUEST_ID.get()
        if rid:
            out["request_id"] = rid
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """The root logger's one handler (stderr), in the text or JSON format; uvicorn's loggers write
    through it too (cli.py passes uvicorn no logging config of its own), and in JSON transformers'.
    Like logging.basicConfig, it changes nothing where logging was configured before."""
    root = logging.getLogger()
    if any(not getattr(h, "chatserve", False) for h in root.handlers):
        return  # configured already (a test runner, a program running the server): left as it is
    handler = logging.StreamHandler()
    handler.chatserve = True
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RequestIdFilter())
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    if fmt == "json":
        # nothing but JSON lines on stderr: Python warnings through logging; transformers' loggers
        # through the root handler instead of their own; no progress bars (weights, downloads)
        logging.captureWarnings(True)
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:
            return
        hf_logging.disable_progress_bar()
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
