"""POST /v1/completions: OpenAI's legacy completion shape, the one evaluation harnesses score with.

No chat template: a prompt is plain text (tokenized as the tokenizer does by default) or token ids,
and several prompts in one request each get `n` choices of their own, all run together in the same
batching engine as chat (each choice is one engine request). `echo` puts the prompt before the
completion; with `logprobs` it brings the prompt tokens' logprobs, which the engine computes in the
prompt's prefill only when asked (SamplingParams.prompt_logprobs), so `max_tokens: 0` scores a
prompt without generating. Validation, errors, admission (429), disconnects and SSE framing are
chat's (server/validation.py, server/plumbing.py).

Every choice's first event is awaited before the reply starts, as for chat: a full queue (429) or a
queue timeout (503) of any choice is the whole request's HTTP status, and a stream starts once
every choice has started.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.request import GenerationRequest, TokenEvent, TokenLogprob
from engine.scheduler import EngineOverloaded

from . import openapi
from .errors import APIError
from .logs import note
from .plumbing import (
    SSE_HEADERS,
    ClientGone,
    ServerContext,
    collect_events,
    first_event,
    pick_model,
    read_body,
    sse,
    until_disconnect,
)
from .protocol import (
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    PromptTokensDetails,
    Usage,
)
from .validation import CompletionPrompt, ValidatedCompletion, parse_body, tokenize_and_fit, validate_completion

log = logging.getLogger("chatserve.server")


def _new_id() -> str:
    return "cmpl-" + secrets.token_urlsafe(18).replace("-", "").replace("_", "")[:24]


def _top(entry: TokenLogprob) -> dict[str, float]:
    """OpenAI's top_logprobs entry: the alternatives, best first (the first of two with the same text
    wins), and the token itself, so it may hold one more than `logprobs`."""
    top: dict[str, float] = {}
    for alt in entry.top_logprobs:
        top.setdefault(alt.token, alt.logprob)
    top.setdefault(entry.token, entry.logprob)
    return top


def _raw(entry: TokenLogprob) -> bytes:
    return bytes(entry.bytes) if entry.bytes is not None else entry.token.encode("utf-8")


class _Offsets:
    """Character offsets of tokens from their bytes, in text that starts at ``start``. A token that
    continues a character begun by the token before it starts where that character starts; one after
    an unfinished character that it does not continue starts after that character's U+FFFD."""

    def __init__(self, start: int = 0):
        self.pos = start
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def next(self, raw: bytes) -> int:
        at = self.pos
        if raw and self.decoder.getstate()[0] and not 0x80 <= raw[0] <= 0xBF:
            at += 1
        self.pos += len(self.decoder.decode(raw))
        return at


class _Choice:
    """One choice (sample j of prompt i): its text and logprobs as they are released, and the
    character offset in the choice's text (the echoed prompt included) where the next token begins."""

    def __init__(self, index: int, prompt: CompletionPrompt, v: ValidatedCompletion, timer):
        self.index = index
        self.prompt = prompt
        self.v = v
        self.timer = timer  # server/metrics.py: this choice's timings, recorded when it ends
        self.offsets = _Offsets(len(prompt.text) if v.echo else 0)  # of generated tokens
        self.last: TokenEvent | None = None

    def echoed(self, prompt_logprobs, engine) -> tuple[str, CompletionLogprobs | None]:
        """The prompt as the choice's text begins, and (with logprobs) its tokens': the first one's
        logprob is null (nothing predicts it)."""
        text = self.prompt.text
        if self.v.logprobs is None:
            return text, None
        ids, entries = self.prompt.ids, prompt_logprobs
        if entries is None or len(entries) != len(ids):
            raise RuntimeError(f"the engine returned {len(entries or [])} prompt logprobs for {len(ids)} tokens")
        first_text, first_bytes = engine.token_texts(ids[:1])[0]
        rest = entries[1:]
        if self.prompt.offsets is not None:
            offsets = list(self.prompt.offsets)
        else:  # a token-id prompt (its text is the ids decoded) or a slow tokenizer
            counter = _Offsets()
            offsets = [counter.next(raw) for raw in [bytes(first_bytes)] + [_raw(e) for e in rest]]
        return text, CompletionLogprobs(
            tokens=[first_text] + [e.token for e in rest],
            token_logprobs=[None] + [e.logprob for e in rest],
            top_logprobs=[None] + [_top(e) for e in rest],
            text_offset=offsets,
        )

    def generated(self, event: TokenEvent) -> tuple[str, CompletionLogprobs | None]:
        """One event's text, and (with logprobs) its tokens'."""
        self.last = event
        if event.finish_reason is not None and event.finish_reason != "error":
            self.timer.finish(event)
        if self.v.logprobs is None:
            return event.text, None
        offsets = [self.offsets.next(_raw(e)) for e in event.logprobs]
        return event.text, CompletionLogprobs(
            tokens=[e.token for e in event.logprobs],
            token_logprobs=[e.logprob for e in event.logprobs],
            top_logprobs=[_top(e) for e in event.logprobs],
            text_offset=offsets,
        )


def _join(parts: list[CompletionLogprobs | None]) -> CompletionLogprobs | None:
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return CompletionLogprobs(
        tokens=[t for p in parts for t in p.tokens],
        token_logprobs=[x for p in parts for x in p.token_logprobs],
        top_logprobs=[x for p in parts for x in p.top_logprobs],
        text_offset=[x for p in parts for x in p.text_offset],
    )


def _usage(v: ValidatedCompletion, choices: list[_Choice]) -> Usage:
    """Each prompt's tokens count once (however many choices it has), each choice's completion; the
    cached tokens are those of each prompt's first choice."""
    firsts = [c for c in choices if c.index % v.n == 0]
    prompt_tokens = sum(len(c.prompt.ids) for c in firsts)
    completion_tokens = sum(c.last.completion_tokens for c in choices if c.last is not None)
    cached = sum(c.last.cached_tokens for c in firsts if c.last is not None)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


async def _start_all(streams, engine) -> list[TokenEvent]:
    """Submit every choice's request and wait for each one's first event; if one fails (queue full,
    queue timeout), the others are cancelled (their streams abort) and the error goes up."""
    tasks = [asyncio.ensure_future(first_event(s, engine)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _close_all(streams) -> None:
    for s in streams:
        with contextlib.suppress(BaseException):
            await s.aclose()


async def _merged(streams, firsts):
    """(choice index, event) from every stream as the events arrive, the first events (already in)
    first; each stream is read up to its finishing event."""
    pending: dict[asyncio.Future, int] = {}
    try:
        for i, first in enumerate(firsts):
            yield i, first
            if first.finish_reason is None:
                pending[asyncio.ensure_future(streams[i].__anext__())] = i
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.get):
                i = pending.pop(task)
                event = task.result()
                yield i, event
                if event.finish_reason is None:
                    pending[asyncio.ensure_future(streams[i].__anext__())] = i
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def add_completions(app: FastAPI, ctx: ServerContext) -> None:
    """Add POST /v1/completions to the app."""

    @app.post(
        "/v1/completions",
        openapi_extra=openapi.COMPLETION_REQUEST_BODY,
        responses={
            200: {
                "model": Completion,
                "content": openapi.COMPLETION_STREAM,
                "description": "The completion: one JSON object, or with `stream: true` a stream of chunks.",
            },
            **openapi.errors(400, 401, 404, 408, 413, 429, 500, 503),
        },
    )
    async def completions(request: Request):
        return await handle_completion(request, ctx)


async def handle_completion(request: Request, ctx: ServerContext):
    """One completion request, from its body to its response (JSON, or a stream of chunks): chat's
    body reading, model routing and engine check, first-event handling (queue timeouts -> 503;
    server/plumbing.py) and metrics (each choice is timed as one chat request is; requests by status
    are counted by the middleware)."""
    arrival = time.perf_counter()
    wire = parse_body(await read_body(request, ctx), CompletionRequest)
    served, reply_name = pick_model(request, ctx, wire.model)
    engine = served.engine
    v = validate_completion(
        wire,
        vocab_size=engine.vocab_size,
        scores_prompts=engine.scores_prompts,
        max_choices=engine.config.max_running + engine.config.max_waiting,
    )
    # off the event loop: tokenizing long prompts would stall every other request meanwhile
    await asyncio.to_thread(tokenize_and_fit, v, engine)
    cid = _new_id()
    choices, streams = [], []
    for i, prompt in enumerate(v.prompts):
        for j in range(v.n):
            params = v.params
            if params.seed is not None and j:
                params = params.replace(seed=(params.seed + j) % 2**63)
            if params.prompt_logprobs is not None and j:
                params = params.replace(prompt_logprobs=None)  # choice 0's serve them all
            index = i * v.n + j
            timer = ctx.metrics.timer(served.name)
            timer.arrival = arrival
            choices.append(_Choice(index, prompt, v, timer))
            streams.append(
                engine.generate(GenerationRequest(request_id=f"{cid}-{index}", prompt_ids=prompt.ids, params=params))
            )
    try:
        firsts = await until_disconnect(request, _start_all(streams, engine))
    except EngineOverloaded as exc:
        await _close_all(streams)
        raise APIError(429, str(exc), code="server_overloaded", retry_after=exc.retry_after) from None
    except ClientGone:
        await _close_all(streams)
        log.info("%s client disconnected while queued; dropped", cid)
        return Response(status_code=499)
    except BaseException:
        await _close_all(streams)
        raise
    for choice in choices:
        choice.timer.first()
    meta = dict(id=cid, created=int(time.time()), model=reply_name, system_fingerprint=served.fingerprint)
    note(request, id=cid, stream=v.stream, choices=len(choices))
    try:
        echoes = [_echo(engine, c, firsts, v) for c in choices] if v.echo else [("", None)] * len(choices)
    except BaseException:
        await _close_all(streams)
        raise
    if v.stream:
        return StreamingResponse(
            _stream(request, v, choices, streams, firsts, echoes, meta),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    return await _complete(request, v, choices, streams, firsts, echoes, meta)


def _echo(engine, choice: _Choice, firsts: list[TokenEvent], v: ValidatedCompletion):
    first_of_prompt = firsts[choice.index - choice.index % v.n]  # the choice that scored the prompt
    return choice.echoed(first_of_prompt.prompt_logprobs, engine)


def _done(request: Request, v: ValidatedCompletion, choices: list[_Choice]) -> None:
    """The access line's token counts and finish reasons (server/logs.py)."""
    usage = _usage(v, choices)
    finishes = sorted({c.last.finish_reason for c in choices if c.last is not None})
    note(
        request,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.prompt_tokens_details.cached_tokens,
        finish=",".join(finishes),
    )


async def _complete(request: Request, v: ValidatedCompletion, choices: list[_Choice], streams, firsts, echoes, meta):
    try:
        results = await until_disconnect(request, asyncio.gather(*map(collect_events, streams, firsts)))
    except ClientGone:
        log.info("%s client disconnected; aborted", meta["id"])
        return Response(status_code=499)
    finally:
        await _close_all(streams)
    out = []
    for choice, events, (echo_text, echo_lps) in zip(choices, results, echoes):
        if events[-1].finish_reason == "error":
            raise APIError(500, events[-1].error or "generation failed", code="engine_error")
        parts = [choice.generated(ev) for ev in events]
        out.append(
            CompletionChoice(
                index=choice.index,
                text=echo_text + "".join(t for t, _ in parts),
                logprobs=_join([echo_lps] + [lp for _, lp in parts]),
                finish_reason=events[-1].finish_reason,
            )
        )
    _done(request, v, choices)
    return JSONResponse(Completion(**meta, choices=out, usage=_usage(v, choices)).model_dump(mode="json"))


async def _stream(request: Request, v: ValidatedCompletion, choices: list[_Choice], streams, firsts, echoes, meta):
    usage_null = {"usage": None} if v.include_usage else {}

    def chunk(choice: CompletionChoice) -> str:
        d = CompletionChunk(**meta, choices=[choice]).model_dump(mode="json", exclude={"usage"})
        d.update(usage_null)
        return sse(d)

    failed = False
    try:
        for choice, (text, lps) in zip(choices, echoes):
            if v.echo:
                yield chunk(CompletionChoice(index=choice.index, text=text, logprobs=lps))
        async with contextlib.aclosing(_merged(streams, firsts)) as events:
            async for i, event in events:
                if event.finish_reason == "error":
                    failed = True
                    yield sse(APIError(500, event.error or "generation failed", code="engine_error").body())
                    break
                text, lps = choices[i].generated(event)
                if text or (lps is not None and lps.tokens) or event.finish_reason is not None:
                    yield chunk(CompletionChoice(index=i, text=text, logprobs=lps, finish_reason=event.finish_reason))
        if v.include_usage and not failed:
            yield sse(CompletionChunk(**meta, choices=[], usage=_usage(v, choices)).model_dump(mode="json"))
        _done(request, v, choices)
        yield "data: [DONE]\n\n"
    except asyncio.CancelledError:
        log.info("%s client disconnected; aborted", meta["id"])
        raise
    finally:
        await _close_all(streams)
