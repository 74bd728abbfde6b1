"""FastAPI app factory: routes, auth, SSE framing. No tensors here: the engine does the maths."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.middleware.cors import CORSMiddleware

from engine.constraints.errors import ConstraintError, ConstraintTooComplex
from engine.request import GenerationRequest
from engine.scheduler import EngineOverloaded

from . import __version__, openapi
from .auth import APIKeyMiddleware
from .errors import APIError, add_error_handlers, bad_request, error_response
from .logs import HEADER as REQUEST_ID_HEADER
from .logs import RequestLogMiddleware, note
from .media import MediaLimits, load_images
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics, MetricsMiddleware
from .playground import mount_playground
from .protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    FunctionOut,
    Health,
    ModelCard,
    ModelHealth,
    ModelList,
    PromptTokensDetails,
    TokenLogprobOut,
    ToolCallOut,
    TopLogprob,
    Usage,
)
from .routing import ANY_MODEL, ModelRouter, ServedModel, serving_entries  # noqa: F401 (ANY_MODEL: re-exported)
from .toolcalls import ToolCallFramer, new_call_id, parse_tool_calls
from .validation import ValidatedRequest, parse_body, render_and_fit, validate

log = logging.getLogger("chatserve.server")

MAX_BODY_BYTES = 16 * 1024 * 1024
# Seconds a client may take to send its whole body once the headers are in: a client trickling
# bytes would otherwise hold a connection (and a slot in uvicorn's limits) open for ever.
BODY_READ_TIMEOUT = 30.0


def _new_id() -> str:
    return "chatcmpl-" + secrets.token_urlsafe(18).replace("-", "").replace("_", "")[:24]


def _logprobs_out(entries) -> list[TokenLogprobOut]:
    return [
        TokenLogprobOut(
            token=e.token,
            logprob=e.logprob,
            bytes=e.bytes,
            top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in e.top_logprobs],
        )
        for e in entries
    ]


def _usage(event) -> Usage:
    return Usage(
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        total_tokens=event.prompt_tokens + event.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=event.cached_tokens),
    )


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


def _wants_tools(v: ValidatedRequest) -> bool:
    return v.constraint is not None and v.constraint.kind == "tools"


def _constraint_param(spec) -> str:
    return "tools" if spec.kind == "tools" else "response_format"


def create_app(
    engine,
    *,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    served_names: set[str] | None = None,
    compile_timeout: float = 10.0,
    body_read_timeout: float | None = BODY_READ_TIMEOUT,
    media: MediaLimits | None = None,
    playground: bool = True,
    metrics: Metrics | None = None,
    protect_metrics: bool = False,
    allowed_origins: list[str] | None = None,
) -> FastAPI:
    """The app serving ``engine``: one Engine (named by its ``model_name``, ``served_names`` its
    aliases), or several models, each with its own engine: a dict ``{name: engine}`` (names of one
    engine are that model's aliases, the first its id) or a list of ``(names, engine)``. Requests
    are routed by their ``model`` field (server/routing.py). ``allowed_origins``: browser origins
    given CORS headers ("*": any); none by default."""
    app = FastAPI(title="chatserve", version=__version__)
    openapi.install(app, bearer_auth=bool(api_key))
    media_limits = media or MediaLimits()
    router = ModelRouter(serving_entries(engine, served_names))
    app.state.models = router
    metrics = metrics or Metrics({m.name: m.engine for m in router.models})
    app.state.draining = False  # set on SIGTERM (server/cli.py): new requests get 503, /ready says no

    add_error_handlers(app)

    # Middlewares, innermost first (each added one wraps the ones before): metrics (per model, so
    # inside the routes' model choice), the API key, CORS (outside the key check, so preflights and
    # 401s carry CORS headers), then request ids and the access line around everything.
    one_model = router.models[0].name if router.single else ""
    app.add_middleware(MetricsMiddleware, metrics=metrics, model=one_model)
    if api_key:
        app.add_middleware(
            APIKeyMiddleware,
            api_key=api_key,
            on_error=error_response,
            protect=("/v1/", "/metrics") if protect_metrics else ("/v1/",),
        )
    if allowed_origins:
        # allow_headers "*": browser SDKs send headers of their own (openai's x-stainless-*) beside
        # Authorization and Content-Type; no credentials (cookies): the API key is a header
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=[REQUEST_ID_HEADER, "Retry-After"],
            max_age=600,
        )
    app.add_middleware(RequestLogMiddleware, default_model=one_model or None)
    if playground:
        mount_playground(app)  # the browser page at / and /playground (server/playground.py)

    def _model_health(m: ServedModel) -> ModelHealth:
        e = m.engine
        return ModelHealth(
            status="ok" if e.alive else "unavailable", running=e.num_running, waiting=e.num_waiting, stats=dict(e.stats)
        )

    @app.get(
        "/health",
        responses={
            **openapi.ok(Health, "Every model's engine is running."),
            503: {"model": Health, "description": "An engine is not running (`models` says which)."},
        },
    )
    async def health():
        """Liveness: every engine loop runs. Per model under `models`; the top level sums them (and,
        with one model, names it and gives its counters, as before several could be served)."""
        per = {m.name: _model_health(m) for m in router.models}
        ok = all(h.status == "ok" for h in per.values())
        body = Health(
            status="ok" if ok else "unavailable",
            running=sum(h.running for h in per.values()),
            waiting=sum(h.waiting for h in per.values()),
            models=per,
        )
        if router.single:
            body.model, body.stats = router.models[0].name, per[router.models[0].name].stats
        return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=200 if ok else 503)

    @app.get(
        "/ready",
        responses={
            200: {"description": "Every model is loaded and its engine loop runs."},
            503: {"description": "Not ready: an engine down, or draining."},
        },
    )
    async def ready():
        """Readiness (load balancers, Kubernetes): every configured model is loaded (the app exists
        only once they are) and its engine loop runs; unlike /health, false while the server drains."""
        names = [m.name for m in router.models]
        down = [m.name for m in router.models if not m.engine.alive]
        if not down and not app.state.draining:
            return {"status": "ready", "models": names}
        return JSONResponse(
            {"status": "draining" if app.state.draining else "unavailable", "models": names, "unavailable": down},
            status_code=503,
        )

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get(
        "/v1/models",
        responses={**openapi.ok(ModelList, "Every name a served model answers to."), **openapi.errors(401)},
    )
    async def models():
        return ModelList(
            data=[ModelCard(id=name, created=m.created) for m in router.models for name in m.names]
        ).model_dump()

    @app.get(
        "/v1/models/{model_id:path}",
        responses={**openapi.ok(ModelCard, "The model, by any of its names."), **openapi.errors(401, 404)},
    )
    async def model(model_id: str):
        found = router.lookup(model_id)
        if found is None:
            raise router.not_found(model_id)
        served, name = found
        return ModelCard(id=name, created=served.created).model_dump()

    async def _read_body(request: Request) -> bytes:
        """The raw body, read here (not by FastAPI) so the size limit holds while the bytes arrive,
        and within body_read_timeout in all (a 408 then, on a connection uvicorn closes)."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body_bytes:
            raise APIError(
                413, f"request body is {length} bytes; the limit is {max_body_bytes}", code="request_too_large"
            )

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

    def _check_target(request: Request, model_name: str | None) -> tuple[ServedModel, str]:
        """The model the request names (server/routing.py), whose engine runs, and the name its
        reply reports; the model goes on the request's metrics and access line."""
        served, reply_name = router.resolve(model_name)
        note(request, model=served.name)
        if not served.engine.alive:
            raise APIError(
                503,
                "the engine is not running" if router.single else f"the engine of {served.name!r} is not running",
                code="engine_unavailable",
            )
        if app.state.draining:
            raise APIError(
                503, "the server is shutting down; retry on another replica", code="shutting_down", retry_after=1
            )
        return served, reply_name

    @app.post(
        "/v1/chat/completions",
        openapi_extra=openapi.CHAT_REQUEST_BODY,
        responses={
            200: {
                "model": ChatCompletion,
                "content": openapi.CHAT_STREAM,
                "description": "The completion: one JSON object, or with `stream: true` a stream of chunks.",
            },
            **openapi.errors(400, 401, 404, 408, 413, 429, 500, 503),
        },
    )
    async def chat_completions(request: Request):
        arrival = time.perf_counter()
        wire = parse_body(await _read_body(request))
        served, reply_name = _check_target(request, wire.model)
        engine = served.engine
        timer = metrics.timer(served.name)
        timer.arrival = arrival
        v = validate(
            wire,
            vocab_size=engine.vocab_size,
            accepts_images=getattr(engine, "accepts_images", False),
            max_images=media_limits.max_images,
        )
        v.images = await load_images(v.messages, media_limits)
        # off the event loop: tokenizing a long prompt (and the processor's image work) would stall
        # every other request meanwhile
        await asyncio.to_thread(render_and_fit, v, engine)
        constraint = await _compile(served, v.constraint) if v.constraint is not None else None
        req = GenerationRequest(
            request_id=_new_id(),
            prompt_ids=v.prompt_ids,
            params=v.params,
            constraint=constraint,
            multimodal=v.multimodal,
        )
        try:
            stream = engine.generate(req)
            first = await _until_disconnect(request, _first_event(stream, engine))
        except EngineOverloaded as exc:
            raise APIError(429, str(exc), code="server_overloaded", retry_after=exc.retry_after) from None
        except ClientGone:
            await stream.aclose()
            log.info("%s client disconnected while queued; dropped", req.request_id)
            return Response(status_code=499)
        timer.first()
        meta = dict(
            id=req.request_id, created=int(time.time()), model=reply_name, system_fingerprint=served.fingerprint
        )
        note(request, id=req.request_id, stream=v.stream)
        t0 = timer  # times the request from its arrival; records its metrics when done
        if v.stream:
            return StreamingResponse(
                _stream(request, engine, v, stream, first, meta, t0),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _complete(request, engine, v, stream, first, meta, t0)

    async def _compile(served: ServedModel, spec):
        """Compile off the event loop (new schemas take seconds); each request gets its own state."""
        started = time.perf_counter()
        try:
            compiled = await asyncio.to_thread(served.engine.compile_constraint, spec, compile_timeout)
        except ConstraintTooComplex as exc:
            if getattr(exc, "retry_after", None):  # ConstraintBusy: no compile worker came free
                raise APIError(
                    429, str(exc), param=_constraint_param(spec), code="compiler_busy", retry_after=exc.retry_after
                ) from None
            raise bad_request(str(exc), param=_constraint_param(spec), code="schema_too_complex") from None
        except ConstraintError as exc:
            raise bad_request(str(exc), param=_constraint_param(spec), code="invalid_schema") from None
        finally:
            metrics.compile.labels(served.name).observe(time.perf_counter() - started)
        return compiled.new_state()

    def _queue_retry_after(engine) -> int:
        """A request that times out in the queue saw no room for queue_timeout seconds: the backlog
        is that deep, so retrying sooner would most likely just time out again. Whole seconds (the
        header's unit), at least 1; 5 if the engine has no queue timeout (then none happens anyway)."""
        queue_timeout = engine.config.queue_timeout
        return max(1, math.ceil(queue_timeout)) if queue_timeout else 5

    async def _first_event(stream, engine):
        """Wait for the first event, so queue timeouts and engine errors get a real HTTP status."""
        first = await stream.__anext__()
        if first.finish_reason == "error":
            await stream.aclose()
            if first.error == "queue_timeout":
                raise APIError(
                    503,
                    "the request waited too long in the queue; retry later",
                    code="queue_timeout",
                    retry_after=_queue_retry_after(engine),
                )
            raise APIError(500, first.error or "generation failed", code="engine_error")
        return first

    def _done(request: Request, last, timer):
        """Record the finished request's metrics and its access line's token counts."""
        timer.finish(last)
        note(
            request,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            cached_tokens=last.cached_tokens,
            finish=last.finish_reason,
        )

    async def _complete(request: Request, engine, v: ValidatedRequest, stream, first, meta, t0):
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
                message = AssistantMessage(
                    content=content,
                    tool_calls=[
                        ToolCallOut(id=new_call_id(), function=FunctionOut(name=c["name"], arguments=c["arguments"]))
                        for c in calls
                    ],
                )
                finish = "tool_calls" if finish == "stop" else finish
        body = ChatCompletion(
            **meta,
            choices=[
                Choice(
                    message=message,
                    logprobs=ChoiceLogprobs(content=_logprobs_out(lps)) if v.params.logprobs else None,
                    finish_reason=finish,
                )
            ],
            usage=_usage(last),
        )
        _done(request, last, t0)
        out = body.model_dump(mode="json")
        if out["choices"][0]["message"]["tool_calls"] is None:
            del out["choices"][0]["message"]["tool_calls"]  # OpenAI omits it when there are none
        return JSONResponse(out)

    async def _stream(request: Request, engine, v: ValidatedRequest, stream, first, meta, t0):
        usage_null = {"usage": None} if v.include_usage else {}

        def chunk(delta: Delta, finish=None, logprobs=None) -> str:
            c = ChatCompletionChunk(**meta, choices=[ChunkChoice(delta=delta, logprobs=logprobs, finish_reason=finish)])
            d = c.model_dump(mode="json", exclude={"usage"})
            d["choices"][0]["delta"] = c.choices[0].delta.model_dump(mode="json", exclude_none=True)
            d.update(usage_null)
            return _sse(d)

        # A plain content chunk is the same JSON every time but for its text: made once through the
        # models above, then filled by string concatenation (the front end frames thousands a second).
        marker = "\x00chatserve-content\x00"
        encoded = json.dumps(marker, ensure_ascii=False)
        prefix, _, suffix = chunk(Delta(content=marker)).partition(encoded)

        def content_chunk(text: str) -> str:
            return prefix + json.dumps(text, ensure_ascii=False) + suffix

        last = first
        calls = ToolCallFramer(engine.tool_family) if _wants_tools(v) else None
        ready = getattr(stream, "ready", list)  # events already delivered: sent in the same write
        backlog: collections.deque = collections.deque()
        try:
            out = [chunk(Delta(role="assistant", content=""))]
            event = first
            while True:
                last = event
                if event.finish_reason == "error":
                    out.append(_sse(APIError(500, event.error or "generation failed", code="engine_error").body()))
                    break
                lp = (
                    ChoiceLogprobs(content=_logprobs_out(event.logprobs))
                    if v.params.logprobs and event.logprobs
                    else None
                )
                if calls is None and lp is None:
                    if event.text:
                        out.append(content_chunk(event.text))
                else:
                    if calls is None:
                        deltas = [Delta(content=event.text)] if event.text else []
                    else:
                        deltas = calls.feed(event.text, final=event.finish_reason is not None)
                    if lp is not None and not deltas:
                        deltas = [Delta(content="")]
                    for i, delta in enumerate(deltas):
                        out.append(chunk(delta, logprobs=lp if i == 0 else None))
                if event.finish_reason is not None:
                    finish = event.finish_reason
                    if calls is not None and calls.count and finish == "stop":
                        finish = "tool_calls"
                    out.append(chunk(Delta(), finish=finish))
                    if v.include_usage:
                        d = ChatCompletionChunk(**meta, choices=[], usage=_usage(event)).model_dump(mode="json")
                        out.append(_sse(d))
                    break
                if not backlog:
                    backlog.extend(ready())
                if backlog:  # this client fell behind by a few steps: catch up in one write
                    event = backlog.popleft()
                    continue
                yield "".join(out)
                out = []
                event = await stream.__anext__()
            _done(request, last, t0)
            out.append("data: [DONE]\n\n")
            yield "".join(out)
        except asyncio.CancelledError:
            log.info("%s client disconnected after %d tokens; aborted", meta["id"], last.completion_tokens)
            raise
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()

    # POST /v1/completions (server/completions.py; imported here, as it uses this module's helpers)
    from .completions import add_completions

    add_completions(app, read_body=_read_body, check_target=_check_target, first_event=_first_event, metrics=metrics)
    return app
