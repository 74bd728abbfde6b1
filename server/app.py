"""FastAPI app factory: routes, auth, SSE framing. No tensors here: the engine does the maths."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.constraints import ConstraintError, ConstraintTooComplex
from engine.request import GenerationRequest
from engine.scheduler import EngineOverloaded

from . import __version__, openapi
from .errors import APIError, bad_request
from .protocol import (AssistantMessage, ChatCompletion, ChatCompletionChunk, Choice, ChoiceLogprobs,
                       ChunkChoice, Delta, FunctionOut, Health, ModelCard, ModelList, TokenLogprobOut, ToolCallOut,
                       TopLogprob, Usage, PromptTokensDetails)
from .toolcalls import ToolCallFramer, new_call_id, parse_tool_calls
from .media import MediaLimits, load_images
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics, MetricsMiddleware
from .playground import mount_playground
from .validation import ValidatedRequest, parse_body, render_and_fit, validate

log = logging.getLogger("chatserve.server")

MAX_BODY_BYTES = 16 * 1024 * 1024
# Seconds a client may take to send its whole body once the headers are in: a client trickling
# bytes would otherwise hold a connection (and a slot in uvicorn's limits) open for ever.
BODY_READ_TIMEOUT = 30.0
# Names clients send when they do not care which model answers (huggingface_hub sends
# "dummy" or "tgi" when given a base_url).
ANY_MODEL = {"", "tgi", "dummy", "default"}


def _new_id() -> str:
    return "chatcmpl-" + secrets.token_urlsafe(18).replace("-", "").replace("_", "")[:24]


def _logprobs_out(entries) -> list[TokenLogprobOut]:
    return [TokenLogprobOut(token=e.token, logprob=e.logprob, bytes=e.bytes,
                            top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes)
                                          for t in e.top_logprobs]) for e in entries]


def _usage(event) -> Usage:
    return Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                 total_tokens=event.prompt_tokens + event.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=event.cached_tokens))


def _sse(obj) -> str:
    payload = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


async def collect_events(stream, first) -> list:
    """Every event of a request's stream: its first (already awaited) and the rest to the end."""
    events = [first]
    if first.finish_reason is None:
        async for ev in stream:
            events.append(ev)
    return events


class ClientGone(Exception):
    pass


async def _until_disconnect(request: Request, coro):
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


class APIKeyMiddleware:
    """Plain ASGI middleware (BaseHTTPMiddleware would hide client disconnects from the routes)."""

    def __init__(self, app, api_key: str, on_error, protect: tuple[str, ...] = ("/v1/",)):
        self.app = app
        self.key = api_key.encode()
        self.on_error = on_error
        self.protect = protect

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(self.protect):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                response = self.on_error(APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                                  code="invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _wants_tools(v: ValidatedRequest) -> bool:
    return v.constraint is not None and v.constraint.kind == "tools"


def _constraint_param(spec) -> str:
    return "tools" if spec.kind == "tools" else "response_format"


def create_app(engine, *, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               served_names: set[str] | None = None, compile_timeout: float = 10.0,
               body_read_timeout: float | None = BODY_READ_TIMEOUT, media: MediaLimits | None = None,
               playground: bool = True, metrics: Metrics | None = None, protect_metrics: bool = False) -> FastAPI:
    app = FastAPI(title="chatserve", version=__version__)
    openapi.install(app, bearer_auth=bool(api_key))
    created = int(time.time())
    media_limits = media or MediaLimits()
    fingerprint = f"chatserve-{__version__}-{engine.loaded.device}-{engine.loaded.dtype}"
    names = {engine.model_name, engine.loaded.source} | (served_names or set())
    metrics = metrics or Metrics({engine.model_name: engine})
    app.state.draining = False   # set on SIGTERM (server/cli.py): new requests get 503, /ready says no

    def error_response(exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(404)
    async def _not_found(request: Request, _exc):
        return error_response(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def _bad_method(request: Request, exc):
        # Starlette's 405 carries the Allow header (RFC 9110 requires it); keep it
        return error_response(APIError(405, f"method {request.method} not allowed on {request.url.path}",
                                       code="method_not_allowed", headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", code="internal_error"))

    app.add_middleware(MetricsMiddleware, metrics=metrics, model=engine.model_name)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key, on_error=error_response,
                           protect=("/v1/", "/metrics") if protect_metrics else ("/v1/",))
    if playground:
        mount_playground(app)      # the browser page at / and /playground (server/playground.py)

    @app.get("/health", responses={**openapi.ok(Health, "The engine is running."),
                                   503: {"model": Health, "description": "The engine is not running."}})
    async def health():
        if engine.alive:
            return {"status": "ok", "model": engine.model_name, "running": engine.num_running,
                    "waiting": engine.num_waiting, "stats": dict(engine.stats)}
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/ready", responses={200: {"description": "Every model is loaded and its engine loop runs."},
                                  503: {"description": "Not ready: loading, engine down, or draining."}})
    async def ready():
        """Readiness (load balancers, Kubernetes): unlike /health, false while the server drains."""
        if engine.alive and not app.state.draining:
            return {"status": "ready", "models": [engine.model_name]}
        return JSONResponse({"status": "draining" if app.state.draining else "unavailable"}, status_code=503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models", responses={**openapi.ok(ModelList, "The one model this server serves."),
                                      **openapi.errors(401)})
    async def models():
        return ModelList(data=[ModelCard(id=engine.model_name, created=created)]).model_dump()

    @app.get("/v1/models/{model_id:path}", responses={**openapi.ok(ModelCard, "The model, by any of its names."),
                                                      **openapi.errors(401, 404)})
    async def model(model_id: str):
        if model_id not in names:
            raise APIError(404, f"model {model_id!r} not found; this server serves {engine.model_name!r}",
                           param="model", code="model_not_found")
        return ModelCard(id=engine.model_name, created=created).model_dump()

    async def _read_body(request: Request) -> bytes:
        """The raw body, read here (not by FastAPI) so the size limit holds while the bytes arrive,
        and within body_read_timeout in all (a 408 then, on a connection uvicorn closes)."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body_bytes:
            raise APIError(413, f"request body is {length} bytes; the limit is {max_body_bytes}",
                           code="request_too_large")

        async def read() -> bytes:
            raw = bytearray()
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > max_body_bytes:
                    raise APIError(413, f"request body exceeds the limit of {max_body_bytes} bytes",
                                   code="request_too_large")
            return bytes(raw)

        try:
            return await asyncio.wait_for(read(), body_read_timeout or None)   # None or 0: no limit
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {body_read_timeout:g} s",
                           code="request_timeout", headers={"Connection": "close"}) from None

    def _check_target(model_name: str | None) -> None:
        """The request names this server's model (or none in particular), and the engine runs."""
        if model_name is not None and model_name not in names and model_name not in ANY_MODEL:
            raise APIError(404, f"model {model_name!r} not found; this server serves {engine.model_name!r}",
                           param="model", code="model_not_found")
        if not engine.alive:
            raise APIError(503, "the engine is not running", code="engine_unavailable")
        if app.state.draining:
            raise APIError(503, "the server is shutting down; retry on another replica", code="shutting_down",
                           retry_after=1)

    @app.post("/v1/chat/completions", openapi_extra=openapi.CHAT_REQUEST_BODY, responses={
        200: {"model": ChatCompletion, "content": openapi.CHAT_STREAM,
              "description": "The completion: one JSON object, or with `stream: true` a stream of chunks."},
        **openapi.errors(400, 401, 404, 408, 413, 429, 500, 503)})
    async def chat_completions(request: Request):
        timer = metrics.timer(engine.model_name)
        wire = parse_body(await _read_body(request))
        _check_target(wire.model)
        v = validate(wire, vocab_size=engine.vocab_size, accepts_images=getattr(engine, "accepts_images", False),
                     max_images=media_limits.max_images)
        v.images = await load_images(v.messages, media_limits)
        # off the event loop: tokenizing a long prompt (and the processor's image work) would stall
        # every other request meanwhile
        await asyncio.to_thread(render_and_fit, v, engine)
        constraint = await _compile(v.constraint) if v.constraint is not None else None
        req = GenerationRequest(request_id=_new_id(), prompt_ids=v.prompt_ids, params=v.params,
                                constraint=constraint, multimodal=v.multimodal)
        try:
            stream = engine.generate(req)
            first = await _until_disconnect(request, _first_event(stream))
        except EngineOverloaded as exc:
            raise APIError(429, str(exc), code="server_overloaded", retry_after=exc.retry_after) from None
        except ClientGone:
            await stream.aclose()
            log.info("%s client disconnected while queued; dropped", req.request_id)
            return Response(status_code=499)
        timer.first()
        meta = dict(id=req.request_id, created=int(time.time()), model=engine.model_name,
                    system_fingerprint=fingerprint)
        t0 = timer   # times the request from its arrival; records its metrics when done
        if v.stream:
            return StreamingResponse(_stream(v, stream, first, meta, t0), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(request, v, stream, first, meta, t0)

    async def _compile(spec):
        """Compile off the event loop (new schemas take seconds); each request gets its own state."""
        try:
            compiled = await asyncio.to_thread(engine.compile_constraint, spec, compile_timeout)
        except ConstraintTooComplex as exc:
            if getattr(exc, "retry_after", None):       # ConstraintBusy: no compile worker came free
                raise APIError(429, str(exc), param=_constraint_param(spec), code="compiler_busy",
                               retry_after=exc.retry_after) from None
            raise bad_request(str(exc), param=_constraint_param(spec),
                              code="schema_too_complex") from None
        except ConstraintError as exc:
            raise bad_request(str(exc), param=_constraint_param(spec), code="invalid_schema") from None
        return compiled.new_state()

    # A request that times out in the queue saw no room for queue_timeout seconds: the backlog is
    # that deep, so retrying sooner would most likely just time out again. Whole seconds (the
    # header's unit), at least 1; 5 if the engine has no queue timeout (then none happens anyway).
    queue_timeout = engine.config.queue_timeout
    queue_retry_after = max(1, math.ceil(queue_timeout)) if queue_timeout else 5

    async def _first_event(stream):
        """Wait for the first event, so queue timeouts and engine errors get a real HTTP status."""
        first = await stream.__anext__()
        if first.finish_reason == "error":
            await stream.aclose()
            if first.error == "queue_timeout":
                raise APIError(503, "the request waited too long in the queue; retry later",
                               code="queue_timeout", retry_after=queue_retry_after)
            raise APIError(500, first.error or "generation failed", code="engine_error")
        return first

    def _done_log(meta, last, timer, stream: bool):
        timer.finish(last)
        log.info("%s done: stream=%s prompt_tokens=%d completion_tokens=%d finish=%s time=%.2fs",
                 meta["id"], stream, last.prompt_tokens, last.completion_tokens, last.finish_reason,
                 time.perf_counter() - timer.arrival)

    async def _complete(request: Request, v: ValidatedRequest, stream, first, meta, t0):
        try:
            events = await _until_disconnect(request, collect_events(stream, first))
        except ClientGone:
            log.info("%s client disconnected; aborted", meta["id"])
            return Response(status_code=499)
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()
        last = events[-1]
        if last.finish_reason == "error":
            raise APIError(500, last.error or "generation failed", code="engine_error")
        text = "".join(e.text for e in events)
        lps = [lp for e in events for lp in e.logprobs]
        message, finish = AssistantMessage(content=text), last.finish_reason
        if _wants_tools(v):
            content, calls = parse_tool_calls(text, engine.tool_family)
            if calls:
                message = AssistantMessage(content=content, tool_calls=[
                    ToolCallOut(id=new_call_id(), function=FunctionOut(name=c["name"], arguments=c["arguments"]))
                    for c in calls])
                finish = "tool_calls" if finish == "stop" else finish
        body = ChatCompletion(
            **meta,
            choices=[Choice(message=message,
                            logprobs=ChoiceLogprobs(content=_logprobs_out(lps)) if v.params.logprobs else None,
                            finish_reason=finish)],
            usage=_usage(last))
        _done_log(meta, last, t0, False)
        out = body.model_dump(mode="json")
        if out["choices"][0]["message"]["tool_calls"] is None:
            del out["choices"][0]["message"]["tool_calls"]   # OpenAI omits it when there are none
        return JSONResponse(out)

    async def _stream(v: ValidatedRequest, stream, first, meta, t0):
        usage_null = {"usage": None} if v.include_usage else {}

        def chunk(delta: Delta, finish=None, logprobs=None) -> str:
            c = ChatCompletionChunk(**meta, choices=[ChunkChoice(delta=delta, logprobs=logprobs,
                                                                 finish_reason=finish)])
            d = c.model_dump(mode="json", exclude={"usage"})
            d["choices"][0]["delta"] = c.choices[0].delta.model_dump(mode="json", exclude_none=True)
            d.update(usage_null)
            return _sse(d)

        last = first
        calls = ToolCallFramer(engine.tool_family) if _wants_tools(v) else None
        try:
            yield chunk(Delta(role="assistant", content=""))
            event = first
            while True:
                last = event
                if event.finish_reason == "error":
                    yield _sse(APIError(500, event.error or "generation failed", code="engine_error").body())
                    break
                lp = ChoiceLogprobs(content=_logprobs_out(event.logprobs)) if v.params.logprobs and event.logprobs else None
                if calls is None:
                    deltas = [Delta(content=event.text)] if event.text else []
                else:
                    deltas = calls.feed(event.text, final=event.finish_reason is not None)
                if lp is not None and not deltas:
                    deltas = [Delta(content="")]
                for i, delta in enumerate(deltas):
                    yield chunk(delta, logprobs=lp if i == 0 else None)
                if event.finish_reason is not None:
                    finish = event.finish_reason
                    if calls is not None and calls.count and finish == "stop":
                        finish = "tool_calls"
                    yield chunk(Delta(), finish=finish)
                    if v.include_usage:
                        d = ChatCompletionChunk(**meta, choices=[], usage=_usage(event)).model_dump(mode="json")
                        yield _sse(d)
                    break
                event = await stream.__anext__()
            yield "data: [DONE]\n\n"
            _done_log(meta, last, t0, True)
        except asyncio.CancelledError:
            log.info("%s client disconnected after %d tokens; aborted", meta["id"], last.completion_tokens)
            raise
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()

    # POST /v1/completions (server/completions.py; imported here, as it uses this module's helpers)
    from .completions import add_completions
    add_completions(app, engine, read_body=_read_body, check_target=_check_target, first_event=_first_event,
                    fingerprint=fingerprint, metrics=metrics)
    return app
