"""The steps every generation endpoint (chat, server/chat.py; completions, server/completions.py)
takes the same way: read the body within its size and time limits, pick the served model the
request names, wait for the first event (so queue timeouts and engine errors get a real HTTP
status), notice a client that hangs up, and frame server-sent events.

What these steps need from the app (its models, metrics, limits) is one ``ServerContext``, made by
``create_app`` (server/app.py) and handed to each endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from dataclasses import dataclass, field

from fastapi import Request
from starlette.datastructures import State

from .errors import APIError
from .logs import note
from .media import MediaLimits
from .metrics import Metrics
from .routing import ModelRouter, ServedModel

MAX_BODY_BYTES = 16 * 1024 * 1024
# Seconds a client may take to send its whole body once the headers are in: a client trickling
# bytes would otherwise hold a connection (and a slot in uvicorn's limits) open for ever.
BODY_READ_TIMEOUT = 30.0


@dataclass
class ServerContext:
    """What the routes share: the served models, the metrics, the request limits, and the app's
    state (where ``draining`` is set on SIGTERM, server/cli.py)."""

    router: ModelRouter
    metrics: Metrics
    state: State
    max_body_bytes: int = MAX_BODY_BYTES
    body_read_timeout: float | None = BODY_READ_TIMEOUT
    compile_timeout: float = 10.0
    media: MediaLimits = field(default_factory=MediaLimits)

    @property
    def draining(self) -> bool:
        return self.state.draining


async def read_body(request: Request, ctx: ServerContext) -> bytes:
    """The raw body, read here (not by FastAPI) so the size limit holds while the bytes arrive,
    and within body_read_timeout in all (a 408 then, on a connection uvicorn closes)."""
    max_body_bytes, body_read_timeout = ctx.max_body_bytes, ctx.body_read_timeout
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_body_bytes:
        raise APIError(413, f"request body is {length} bytes; the limit is {max_body_bytes}", code="request_too_large")

    async def read() -> bytes:
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > max_body_bytes:
                raise APIError(
                    413, f"request body exceeds the limit of {max_body_bytes} bytes", code="request_too_large"
                )
        return bytes(raw)

    try:
        return await asyncio.wait_for(read(), body_read_timeout or None)  # None or 0: no limit
    except asyncio.TimeoutError:
        raise APIError(
            408,
            f"the request body did not arrive within {body_read_timeout:g} s",
            code="request_timeout",
            headers={"Connection": "close"},
        ) from None


def pick_model(request: Request, ctx: ServerContext, model_name: str | None) -> tuple[ServedModel, str]:
    """The model the request names (server/routing.py), whose engine runs, and the name its
    reply reports; the model goes on the request's metrics and access line."""
    router = ctx.router
    served, reply_name = router.resolve(model_name)
    note(request, model=served.name)
    if not served.engine.alive:
        raise APIError(
            503,
            "the engine is not running" if router.single else f"the engine of {served.name!r} is not running",
            code="engine_unavailable",
        )
    if ctx.draining:
        raise APIError(
            503, "the server is shutting down; retry on another replica", code="shutting_down", retry_after=1
        )
    return served, reply_name


def queue_retry_after(engine) -> int:
    """A request that times out in the queue saw no room for queue_timeout seconds: the backlog
    is that deep, so retrying sooner would most likely just time out again. Whole seconds (the
    header's unit), at least 1; 5 if the engine has no queue timeout (then none happens anyway)."""
    queue_timeout = engine.config.queue_timeout
    return max(1, math.ceil(queue_timeout)) if queue_timeout else 5


async def first_event(stream, engine):
    """Wait for the first event, so queue timeouts and engine errors get a real HTTP status."""
    first = await stream.__anext__()
    if first.finish_reason == "error":
        await stream.aclose()
        if first.error == "queue_timeout":
            raise APIError(
                503,
                "the request waited too long in the queue; retry later",
                code="queue_timeout",
                retry_after=queue_retry_after(engine),
            )
        raise APIError(500, first.error or "generation failed", code="engine_error")
    return first


async def collect_events(stream, first) -> list:
    """Every event of a request's stream: its first (already awaited) and the rest to the end."""
    events = [first]
    if first.finish_reason is None:
        async for ev in stream:
            events.append(ev)
    return events


class ClientGone(Exception):
    pass


async def until_disconnect(request: Request, coro):
    """Run coro, but cancel it (and raise ClientGone) if the client hangs up first.

    After the body is read, the next ASGI message is http.disconnect, so waiting on receive()
    sees a hang-up at once, while the request is still queued or generating.
    """

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
    if work.cancelled():
        raise ClientGone()
    return work.result()


# JSON may hold U+0085, U+2028 and U+2029 raw, but str.splitlines breaks lines there, and so do the
# iter_lines of requests and httpx (what huggingface_hub's clients read streams with): escaped, a
# chunk stays one line for every client
LINE_SAFE = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def json_line(obj) -> str:
    """``obj`` as compact JSON, UTF-8 as is, on one line whoever splits it."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(LINE_SAFE)


def sse(obj) -> str:
    """One server-sent event: a JSON object (compact, UTF-8 as is, one line) or a string sent as it is."""
    payload = obj if isinstance(obj, str) else json_line(obj)
    return f"data: {payload}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
