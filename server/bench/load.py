"""Load generation: send streamed chat completions in a closed or open loop and record each one.

``send_request`` POSTs one request and records, in a ``RequestResult``, the send time, the time
of every chunk that carries text and the end time. ``run_load`` drives many of them (closed loop:
``concurrency`` in flight; open loop: Poisson arrivals at ``request_rate``) and hands the results
to ``stats.summarize``.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from .stats import summarize

# A prompt is either a user message (str) or a full ``messages`` list.
Prompt = str | list

DEFAULT_PROMPTS: list[str] = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle. "
    "Describe every day of the following month in detail.",
    "Explain in great detail how a modern CPU executes an instruction, from fetch "
    "to retirement, with examples for each pipeline stage.",
    "Write a long, detailed travel guide to an imaginary city, covering its history, "
    "neighbourhoods, food, festivals and transport.",
    "Describe, step by step and at length, how to bake sourdough bread from scratch, "
    "including the starter, every fold, and common mistakes.",
    "Write an epic poem of at least forty stanzas about the first expedition to Mars.",
    "Give a thorough, chapter-by-chapter summary of an imaginary 500-page fantasy "
    "novel about a war between two kingdoms of clockmakers.",
]


@dataclass
class RequestResult:
    """What happened to one streamed chat completion. Times are ``perf_counter`` seconds."""

    index: int
    ok: bool = False
    status: int | None = None  # HTTP status; None when no response arrived
    error: str | None = None
    error_kind: str | None = None  # "429", "500", "stream_error", "timeout", "ConnectError", ...
    scheduled: float = 0.0  # when it was due (open loop) / picked up (closed loop)
    start: float = 0.0  # when the request was sent
    end: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # chunks with text (content or a reasoning field)
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    usage_reported: bool = False
    finish_reason: str | None = None
    got_done: bool = False

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def e2e(self) -> float | None:
        return self.end - self.start if self.end is not None else None

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.completion_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.completion_tokens - 1)

    def fail(self, kind: str, message: str) -> None:
        self.ok = False
        self.error_kind = kind
        self.error = message

    def to_dict(self, t0: float) -> dict:
        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - t0, 6)

        return {
            "index": self.index,
            "ok": self.ok,
            "status": self.status,
            "error_kind": self.error_kind,
            "error": self.error,
            "scheduled_s": rel(self.scheduled),
            "start_s": rel(self.start),
            "end_s": rel(self.end),
            "ttft_s": self.ttft,
            "e2e_s": self.e2e,
            "tpot_s": self.tpot,
            "completion_tokens": self.completion_tokens,
            "prompt_tokens": self.prompt_tokens,
            "usage_reported": self.usage_reported,
            "content_chunks": len(self.chunk_times),
            "finish_reason": self.finish_reason,
        }


def _error_message(err: Any) -> str:
    if isinstance(err, dict):
        msg = err.get("message") or err.get("error") or err
        return str(msg)
    return str(err)


def _delta_text(delta: dict) -> str:
    # content, plus the reasoning fields some servers (vLLM, transformers) use
    parts = []
    for key in ("content", "reasoning_content", "reasoning"):
        v = delta.get(key)
        if isinstance(v, str) and v:
            parts.append(v)
    return "".join(parts)


def _handle_event(res: RequestResult, obj: Any, now: float) -> bool:
    """Apply one parsed SSE ``data:`` object; return False to stop reading."""
    if not isinstance(obj, dict):
        res.fail("stream_error", f"unexpected event: {obj!r}"[:300])
        return False
    if obj.get("error"):
        res.fail("stream_error", _error_message(obj["error"])[:500])
        return False
    usage = obj.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        res.usage_reported = True
        res.completion_tokens = int(usage["completion_tokens"])
        if usage.get("prompt_tokens") is not None:
            res.prompt_tokens = int(usage["prompt_tokens"])
    got_text = False
    for choice in obj.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        # streaming chunks carry "delta"; a non-streamed answer carries "message"
        delta = choice.get("delta") or choice.get("message") or {}
        if isinstance(delta, dict) and _delta_text(delta):
            got_text = True
        if choice.get("finish_reason"):
            res.finish_reason = choice["finish_reason"]
    if got_text:
        res.chunk_times.append(now)
    return True


async def _stream_one(client: httpx.AsyncClient, url: str, payload: dict, headers: dict, res: RequestResult) -> None:
    res.start = time.perf_counter()
    async with client.stream("POST", url, json=payload, headers=headers) as resp:
        res.status = resp.status_code
        if resp.status_code != 200:
            body = (await resp.aread()).decode("utf-8", "replace")
            msg = body
            try:
                obj = json.loads(body)
                if isinstance(obj, dict):
                    msg = _error_message(obj.get("error") or obj.get("detail") or obj)
            except ValueError:
                pass
            res.end = time.perf_counter()
            res.fail(str(resp.status_code), f"HTTP {resp.status_code}: {msg}"[:500])
            return
        ctype = resp.headers.get("content-type", "")
        if "text/event-stream" not in ctype and "application/json" in ctype:
            # the server ignored stream=true: the whole answer is one "chunk"
            body = await resp.aread()
            now = time.perf_counter()
            res.end = now
            try:
                obj = json.loads(body)
            except ValueError:
                res.fail("stream_error", f"bad JSON body: {body[:200]!r}")
                return
            res.ok = _handle_event(res, obj, now)
            return
        res.ok = True
        async for line in resp.aiter_lines():
            now = time.perf_counter()
            line = line.strip()
            if not line.startswith("data:"):
                continue  # blank separators, ": keep-alive" comments, event:/id: fields
            data = line[5:].strip()
            if data == "[DONE]":
                res.got_done = True
                break
            try:
                obj = json.loads(data)
            except ValueError:
                res.fail("stream_error", f"bad SSE data: {data[:200]!r}")
                break
            if not _handle_event(res, obj, now):
                break
        res.end = time.perf_counter()
    if res.ok and not res.usage_reported:
        res.completion_tokens = len(res.chunk_times)


async def send_request(
    client: httpx.AsyncClient,
    url: str,
    payload: dict,
    headers: dict | None = None,
    timeout: float | None = None,
    index: int = 0,
) -> RequestResult:
    """POST one streaming chat completion to ``url`` and time it.

    Timeouts, HTTP errors, transport errors and error events are recorded in the result, not raised.
    """
    res = RequestResult(index=index)
    res.scheduled = time.perf_counter()
    try:
        if timeout:
            await asyncio.wait_for(_stream_one(client, url, payload, headers or {}, res), timeout)
        else:
            await _stream_one(client, url, payload, headers or {}, res)
    except asyncio.TimeoutError:
        res.fail("timeout", f"no complete answer within {timeout}s")
    except httpx.TimeoutException as e:
        res.fail("timeout", f"{type(e).__name__}: {e}")
    except httpx.HTTPError as e:
        res.fail(type(e).__name__, f"{type(e).__name__}: {e}")
    except OSError as e:
        res.fail(type(e).__name__, f"{type(e).__name__}: {e}")
    if res.end is None:
        res.end = time.perf_counter()
    if not res.start:
        res.start = res.scheduled
    return res


def _auth_headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def build_payload(
    model: str,
    prompt: Prompt,
    max_tokens: int,
    temperature: float = 0.0,
    ignore_eos: bool = False,
    extra_body: dict | None = None,
) -> dict:
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    payload: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        # honoured by chatserve and vLLM; OpenAI-compatible servers ignore unknown fields
        payload["ignore_eos"] = True
        payload["min_tokens"] = max_tokens
    if extra_body:
        payload.update(extra_body)
    return payload


async def fetch_model(
    base_url: str,
    api_key: str | None = None,
    timeout: float = 30.0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> str:
    """The first model id from ``GET {base_url}/models``."""
    async with httpx.AsyncClient(timeout=timeout, transport=transport) as client:
        resp = await client.get(f"{base_url.rstrip('/')}/models", headers=_auth_headers(api_key))
        resp.raise_for_status()
        data = resp.json().get("data") or []
        if not data:
            raise ValueError(f"{base_url}/models lists no models")
        return data[0]["id"]


async def run_load(
    base_url: str,
    model: str,
    concurrency: int | None,
    num_requests: int,
    max_tokens: int,
    prompts: Sequence[Prompt],
    *,
    request_rate: float | None = None,
    temperature: float = 0.0,
    ignore_eos: bool = False,
    api_key: str | None = None,
    warmup: int = 0,
    timeout: float | None = 300.0,
    extra_body: dict | None = None,
    seed: int = 0,
    progress: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict:
    """Run one benchmark and return its summary dict (see ``summarize``).

    ``request_rate=None``: closed loop with ``concurrency`` requests in flight.
    ``request_rate=R``: open loop, Poisson arrivals at R req/s, at most
    ``concurrency`` in flight (None = no cap). ``warmup`` requests are sent one
    by one first and not counted. ``transport`` is passed to ``httpx.AsyncClient``
    (e.g. ``httpx.MockTransport`` in tests).
    """
    if not prompts:
        raise ValueError("need at least one prompt")
    if request_rate is None and not concurrency:
        raise ValueError("closed loop needs concurrency >= 1")
    if request_rate is not None and request_rate <= 0:
        raise ValueError("request_rate must be > 0")
    url = f"{base_url.rstrip('/')}/chat/completions"
    headers = _auth_headers(api_key)
    if concurrency:
        limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    else:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    # per-request deadline is enforced by send_request; httpx's own timeouts are per I/O step
    client_timeout = httpx.Timeout(timeout, connect=min(timeout, 30.0)) if timeout else httpx.Timeout(None)

    def payload_for(i: int) -> dict:
        return build_payload(model, prompts[i % len(prompts)], max_tokens, temperature, ignore_eos, extra_body)

    results: list[RequestResult | None] = [None] * num_requests
    bar = None
    if progress:
        from tqdm.auto import tqdm

        label = f"c={concurrency}" if request_rate is None else f"rate={request_rate:g}/s"
        bar = tqdm(total=num_requests, desc=label, unit="req", leave=False, file=sys.stderr)

    async with httpx.AsyncClient(limits=limits, timeout=client_timeout, transport=transport) as client:
        for w in range(warmup):
            await send_request(client, url, payload_for(w), headers, timeout, index=-1 - w)

        async def one(i: int, scheduled: float) -> None:
            r = await send_request(client, url, payload_for(i), headers, timeout, index=i)
            r.scheduled = scheduled
            results[i] = r
            if bar is not None:
                bar.update(1)

        t0 = time.perf_counter()
        if request_rate is None:
            indices = iter(range(num_requests))

            async def worker() -> None:
                for i in indices:  # shared iterator: each index goes to exactly one worker
                    await one(i, time.perf_counter())

            await asyncio.gather(*(worker() for _ in range(min(concurrency, num_requests))))
        else:
            rng = random.Random(seed)
            sem = asyncio.Semaphore(concurrency) if concurrency else None

            async def arrival(i: int, due: float) -> None:
                if sem is None:
                    await one(i, due)
                else:
                    async with sem:
                        await one(i, due)

            tasks = []
            due = t0
            for i in range(num_requests):
                if i:
                    due += rng.expovariate(request_rate)
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(arrival(i, due)))
            await asyncio.gather(*tasks)
        t1 = time.perf_counter()
    if bar is not None:
        bar.close()

    done = [r for r in results if r is not None]
    return summarize(
        done,
        t0,
        t1,
        mode="closed" if request_rate is None else "open",
        concurrency=concurrency,
        request_rate=request_rate,
        max_tokens=max_tokens,
        model=model,
        base_url=base_url,
        ignore_eos=ignore_eos,
    )
