"""POST /v1/chat/completions: a chat request through validation, the chat template and the engine,
answered as one ChatCompletion or, with ``stream: true``, as a stream of chunks (SSE), tool calls
framed as OpenAI's (server/toolcalls.py). The steps it shares with /v1/completions (body, model,
first event, disconnects) are in server/plumbing.py."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.constraints.errors import ConstraintError, ConstraintTooComplex
from engine.request import GenerationRequest
from engine.scheduler import EngineOverloaded

from . import openapi
from .errors import APIError, bad_request
from .logs import note
from .media import load_images
from .plumbing import (
    SSE_HEADERS,
    ClientGone,
    ServerContext,
    collect_events,
    first_event,
    json_line,
    pick_model,
    read_body,
    sse,
    until_disconnect,
)
from .protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    FunctionOut,
    PromptTokensDetails,
    TokenLogprobOut,
    ToolCallOut,
    TopLogprob,
    Usage,
)
from .routing import ServedModel
from .toolcalls import ToolCallFramer, new_call_id, parse_tool_calls
from .validation import ValidatedRequest, parse_body, render_and_fit, validate

log = logging.getLogger("chatserve.server")


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


def _wants_tools(v: ValidatedRequest) -> bool:
    return v.constraint is not None and v.constraint.kind == "tools"


def _constraint_param(spec) -> str:
    return "tools" if spec.kind == "tools" else "response_format"


def add_chat_completions(app: FastAPI, ctx: ServerContext) -> None:
    """Add POST /v1/chat/completions to the app."""

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
        return await handle_chat_completion(request, ctx)


async def handle_chat_completion(request: Request, ctx: ServerContext):
    """One chat request, from its body to its response (JSON, or a stream of chunks)."""
    arrival = time.perf_counter()
    wire = parse_body(await read_body(request, ctx))
    served, reply_name = pick_model(request, ctx, wire.model)
    engine = served.engine
    timer = ctx.metrics.timer(served.name)
    timer.arrival = arrival
    v = validate(
        wire,
        vocab_size=engine.vocab_size,
        accepts_images=getattr(engine, "accepts_images", False),
        max_images=ctx.media.max_images,
    )
    v.images = await load_images(v.messages, ctx.media)
    # off the event loop: tokenizing a long prompt (and the processor's image work) would stall
    # every other request meanwhile
    await asyncio.to_thread(render_and_fit, v, engine)
    constraint = await _compile(ctx, served, v.constraint) if v.constraint is not None else None
    req = GenerationRequest(
        request_id=_new_id(),
        prompt_ids=v.prompt_ids,
        params=v.params,
        constraint=constraint,
        multimodal=v.multimodal,
    )
    try:
        stream = engine.generate(req)
        first = await until_disconnect(request, first_event(stream, engine))
    except EngineOverloaded as exc:
        raise APIError(429, str(exc), code="server_overloaded", retry_after=exc.retry_after) from None
    except ClientGone:
        await stream.aclose()
        log.info("%s client disconnected while queued; dropped", req.request_id)
        return Response(status_code=499)
    timer.first()
    meta = dict(id=req.request_id, created=int(time.time()), model=reply_name, system_fingerprint=served.fingerprint)
    note(request, id=req.request_id, stream=v.stream)
    # the timer times the request from its arrival; records its metrics when done
    if v.stream:
        return StreamingResponse(
            _stream(request, engine, v, stream, first, meta, timer),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    return await _complete(request, engine, v, stream, first, meta, timer)


async def _compile(ctx: ServerContext, served: ServedModel, spec):
    """Compile off the event loop (new schemas take seconds); each request gets its own state."""
    started = time.perf_counter()
    try:
        compiled = await asyncio.to_thread(served.engine.compile_constraint, spec, ctx.compile_timeout)
    except ConstraintTooComplex as exc:
        if getattr(exc, "retry_after", None):  # ConstraintBusy: no compile worker came free
            raise APIError(
                429, str(exc), param=_constraint_param(spec), code="compiler_busy", retry_after=exc.retry_after
            ) from None
        raise bad_request(str(exc), param=_constraint_param(spec), code="schema_too_complex") from None
    except ConstraintError as exc:
        raise bad_request(str(exc), param=_constraint_param(spec), code="invalid_schema") from None
    finally:
        ctx.metrics.compile.labels(served.name).observe(time.perf_counter() - started)
    return compiled.new_state()


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


async def _complete(request: Request, engine, v: ValidatedRequest, stream, first, meta, timer):
    """The whole reply as one ChatCompletion."""
    try:
        events = await until_disconnect(request, collect_events(stream, first))
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
    _done(request, last, timer)
    out = body.model_dump(mode="json")
    if out["choices"][0]["message"]["tool_calls"] is None:
        del out["choices"][0]["message"]["tool_calls"]  # OpenAI omits it when there are none
    return JSONResponse(out)


async def _stream(request: Request, engine, v: ValidatedRequest, stream, first, meta, timer):
    """The reply as server-sent chunks, then ``data: [DONE]``."""
    usage_null = {"usage": None} if v.include_usage else {}

    def chunk(delta: Delta, finish=None, logprobs=None) -> str:
        c = ChatCompletionChunk(**meta, choices=[ChunkChoice(delta=delta, logprobs=logprobs, finish_reason=finish)])
        d = c.model_dump(mode="json", exclude={"usage"})
        d["choices"][0]["delta"] = c.choices[0].delta.model_dump(mode="json", exclude_none=True)
        d.update(usage_null)
        return sse(d)

    # A plain content chunk is the same JSON every time but for its text: made once through the
    # models above, then filled by string concatenation (the front end frames thousands a second).
    marker = "\x00chatserve-content\x00"
    encoded = json.dumps(marker, ensure_ascii=False)
    prefix, _, suffix = chunk(Delta(content=marker)).partition(encoded)

    def content_chunk(text: str) -> str:
        return prefix + json_line(text) + suffix

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
                out.append(sse(APIError(500, event.error or "generation failed", code="engine_error").body()))
                break
            lp = ChoiceLogprobs(content=_logprobs_out(event.logprobs)) if v.params.logprobs and event.logprobs else None
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
                    out.append(sse(d))
                break
            if not backlog:
                backlog.extend(ready())
            if backlog:  # this client fell behind by a few steps: catch up in one write
                event = backlog.popleft()
                continue
            yield "".join(out)
            out = []
            event = await stream.__anext__()
        _done(request, last, timer)
        out.append("data: [DONE]\n\n")
        yield "".join(out)
    except asyncio.CancelledError:
        log.info("%s client disconnected after %d tokens; aborted", meta["id"], last.completion_tokens)
        raise
    finally:
        with contextlib.suppress(Exception):
            await stream.aclose()
