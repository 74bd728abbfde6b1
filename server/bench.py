"""``chatserve bench``: a load generator for any OpenAI-compatible chat endpoint.

Works against chatserve, vLLM, TGI, ``transformers serve`` or anything else that
speaks ``POST {base}/chat/completions`` with ``stream=true``. It deliberately
imports nothing from ``engine/`` and no torch, so it can run on a client box.

Two load shapes:

* closed loop (``--concurrency 1,8,32``): ``c`` workers each keep exactly one
  request in flight until ``--num-requests`` have been sent; one run per value.
* open loop (``--request-rate R``): requests arrive as a Poisson process at
  ``R`` req/s regardless of how fast the server answers; ``--concurrency C``
  then caps the number in flight (arrivals beyond it wait client-side).

Per request it records the send time, the time of every content chunk, and the
end time; TTFT is first content chunk - send, ITLs are the gaps between
consecutive content chunks (a server that packs several tokens in one chunk
shows up as fewer, longer gaps), TPOT is (e2e - TTFT) / (tokens - 1), with
tokens from the final ``usage`` chunk (``stream_options.include_usage``) or, if
the server sends none, the number of content chunks.

Programmatic use::

    from server.bench import run_load
    summary = asyncio.run(run_load("http://127.0.0.1:8000/v1", "my-model",
                                   concurrency=8, num_requests=64, max_tokens=64,
                                   prompts=DEFAULT_PROMPTS))
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import httpx

# A prompt is either a user message (str) or a full ``messages`` list.
Prompt = Union[str, list]

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

DEFAULT_CONCURRENCY = [1, 8, 32]
PERCENTILES = (50, 90, 99)


# --------------------------------------------------------------------------- #
# One request
# --------------------------------------------------------------------------- #


@dataclass
class RequestResult:
    """What happened to one streamed chat completion. Times are ``perf_counter`` seconds."""

    index: int
    ok: bool = False
    status: Optional[int] = None  # HTTP status; None when no response arrived
    error: Optional[str] = None
    error_kind: Optional[str] = None  # "429", "500", "stream_error", "timeout", "ConnectError", ...
    scheduled: float = 0.0  # when it was due (open loop) / picked up (closed loop)
    start: float = 0.0  # when the request was sent
    end: Optional[float] = None
    chunk_times: list[float] = field(default_factory=list)  # content chunks only
    completion_tokens: int = 0
    prompt_tokens: Optional[int] = None
    usage_reported: bool = False
    finish_reason: Optional[str] = None
    got_done: bool = False

    @property
    def ttft(self) -> Optional[float]:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def e2e(self) -> Optional[float]:
        return self.end - self.start if self.end is not None else None

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> Optional[float]:
        if self.ttft is None or self.e2e is None or self.completion_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.completion_tokens - 1)

    def fail(self, kind: str, message: str) -> None:
        self.ok = False
        self.error_kind = kind
        self.error = message

    def to_dict(self, t0: float) -> dict:
        def rel(t: Optional[float]) -> Optional[float]:
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
    headers: Optional[dict] = None,
    timeout: Optional[float] = None,
    index: int = 0,
) -> RequestResult:
    """POST one streaming chat completion to ``url`` and time it. Never raises (except cancellation)."""
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


# --------------------------------------------------------------------------- #
# Statistics
# --------------------------------------------------------------------------- #


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile (numpy's default method); None for no data."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def latency_stats(values_s: Sequence[float]) -> dict:
    """mean / p50 / p90 / p99 / min / max in milliseconds, plus the sample count."""
    vals = [v * 1000.0 for v in values_s if v is not None]
    out: dict[str, Any] = {"n": len(vals)}
    out["mean"] = sum(vals) / len(vals) if vals else None
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(vals, p)
    out["min"] = min(vals) if vals else None
    out["max"] = max(vals) if vals else None
    return out


def summarize(results: Sequence[RequestResult], t0: float, t1: float, **meta: Any) -> dict:
    """Aggregate per-request results of one run (t0..t1 is its wall-clock span)."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    by_kind = Counter(r.error_kind or "unknown" for r in failed)
    duration = max(t1 - t0, 1e-9)
    out_tokens = sum(r.completion_tokens for r in ok)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    errors: list[str] = []
    for r in failed:
        if r.error and r.error not in errors:
            errors.append(r.error)
        if len(errors) >= 5:
            break
    return {
        **meta,
        "num_requests": len(results),
        "ok": len(ok),
        "failed": len(failed),
        "failed_by_status": dict(sorted(by_kind.items())),
        "rate_limited": by_kind.get("429", 0),
        "errors": errors,
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_output_tokens": out_tokens,
        "total_prompt_tokens": sum(prompt_tokens) if prompt_tokens else None,
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        "usage_missing": sum(1 for r in ok if not r.usage_reported),
        "ttft_ms": latency_stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": latency_stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": latency_stats([g for r in ok for g in r.itls]),
        "e2e_ms": latency_stats([r.e2e for r in ok if r.e2e is not None]),
        "requests": [r.to_dict(t0) for r in results],
    }


# --------------------------------------------------------------------------- #
# A run
# --------------------------------------------------------------------------- #


def _auth_headers(api_key: Optional[str]) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def build_payload(
    model: str,
    prompt: Prompt,
    max_tokens: int,
    temperature: float = 0.0,
    ignore_eos: bool = False,
    extra_body: Optional[dict] = None,
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
    api_key: Optional[str] = None,
    timeout: float = 30.0,
    transport: Optional[httpx.AsyncBaseTransport] = None,
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
    concurrency: Optional[int],
    num_requests: int,
    max_tokens: int,
    prompts: Sequence[Prompt],
    *,
    request_rate: Optional[float] = None,
    temperature: float = 0.0,
    ignore_eos: bool = False,
    api_key: Optional[str] = None,
    warmup: int = 0,
    timeout: Optional[float] = 300.0,
    extra_body: Optional[dict] = None,
    seed: int = 0,
    progress: bool = False,
    transport: Optional[httpx.AsyncBaseTransport] = None,
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

    results: list[Optional[RequestResult]] = [None] * num_requests
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


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #


def run_label(run: dict) -> str:
    if run.get("mode") == "open":
        cap = f", c<={run['concurrency']}" if run.get("concurrency") else ""
        return f"rate={run['request_rate']:g}/s{cap}"
    return f"c={run['concurrency']}"


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, sep, *body])


def format_report(runs: Sequence[dict]) -> str:
    rows = []
    for r in runs:
        rows.append(
            [
                run_label(r),
                str(r["ok"]),
                str(r["failed"]),
                str(r["rate_limited"]),
                _fmt(r["duration_s"], 2),
                _fmt(r["request_throughput"], 2),
                _fmt(r["output_throughput"], 1),
                _fmt(r["mean_output_tokens"], 1),
            ]
        )
    out = [
        _table(["run", "ok", "failed", "429", "duration s", "req/s", "out tok/s", "tok/req"], rows),
        "",
    ]
    lrows = []
    for r in runs:
        for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
            s = r[key]
            lrows.append(
                [run_label(r), name, _fmt(s["mean"]), *(_fmt(s[f"p{p}"]) for p in PERCENTILES), str(s["n"])]
            )
    out.append(_table(["run", "latency (ms)", "mean", *(f"p{p}" for p in PERCENTILES), "n"], lrows))
    notes = []
    for r in runs:
        if r["failed"]:
            kinds = ", ".join(f"{k}: {v}" for k, v in r["failed_by_status"].items())
            notes.append(f"{run_label(r)} failures ({kinds}); first: {r['errors'][0] if r['errors'] else '?'}")
        if r["ok"] and r["usage_missing"]:
            notes.append(
                f"{run_label(r)}: {r['usage_missing']} responses had no usage chunk; tokens counted as content chunks"
            )
    if notes:
        out += ["", *notes]
    return "\n".join(out)


def write_plot(runs: Sequence[dict], path: Path) -> None:
    """Output tokens/s and TTFT p50/p90 against concurrency (or request rate)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    open_loop = any(r.get("mode") == "open" for r in runs)
    xs = [(r["request_rate"] if open_loop else r["concurrency"]) or 0 for r in runs]
    xlabel = "request rate (req/s)" if open_loop else "concurrency"
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(xs, [r["output_throughput"] for r in runs], "o-")
    ax1.set_title("output tokens/s")
    ax1.set_ylabel("tokens/s")
    nan = float("nan")
    for p, style in (("p50", "o-"), ("p90", "s--")):
        ax2.plot(xs, [r["ttft_ms"][p] if r["ttft_ms"][p] is not None else nan for r in runs], style, label=f"TTFT {p}")
    ax2.set_title("time to first token")
    ax2.set_ylabel("ms")
    ax2.legend()
    positive = [x for x in xs if x > 0]
    for ax in (ax1, ax2):
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        if positive and len(positive) == len(xs) and max(positive) / min(positive) >= 8:
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
        if xs:
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{x:g}" for x in xs])
        ax.set_ylim(bottom=0)
    model = runs[0].get("model") if runs else ""
    fig.suptitle(f"chatserve bench: {model}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def _concurrency_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError("concurrency values must be >= 1")
    return vals


def _positive_float(text: str) -> float:
    v = float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser`` (a subparser of ``chatserve``)."""
    g = parser.add_argument_group("target")
    g.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI-compatible base URL (default: %(default)s)")
    g.add_argument("--model", default=None, help="model id to send (default: the first id from GET {base-url}/models)")
    g.add_argument(
        "--api-key",
        default=None,
        help="sent as 'Authorization: Bearer KEY' (default: $CHATSERVE_API_KEY or $OPENAI_API_KEY)",
    )
    g = parser.add_argument_group("load")
    g.add_argument(
        "--concurrency",
        type=_concurrency_list,
        default=None,
        help="closed loop: requests in flight, comma list, one run per value (default: 1,8,32); "
        "with --request-rate: a single cap on requests in flight",
    )
    g.add_argument(
        "--request-rate",
        type=_positive_float,
        default=None,
        help="open loop: Poisson arrivals at R req/s (one run)",
    )
    g.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help="requests per run (default: max(4*concurrency, 16); open loop without cap: max(16, 10*rate))",
    )
    g.add_argument("--warmup", type=int, default=1, help="unmeasured requests sent before the first run (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed for Poisson arrival times (default: %(default)s)")
    g = parser.add_argument_group("requests")
    g.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default: %(default)s)")
    g.add_argument("--prompt", action="append", default=None, help="user prompt (repeatable; default: built-in long-answer prompts)")
    g.add_argument(
        "--prompt-file",
        default=None,
        help="prompts, one per non-empty line; a .jsonl file holds one JSON string, "
        '{"prompt": ...} or {"messages": [...]} per line',
    )
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: %(default)s)")
    g.add_argument(
        "--ignore-eos",
        action="store_true",
        help='send "ignore_eos": true and "min_tokens": max_tokens (chatserve, vLLM) so every answer is max_tokens long',
    )
    g.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    g.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default: %(default)s)")
    g = parser.add_argument_group("output")
    g.add_argument("--output", default=None, help="results JSON (default: bench-results/bench-<timestamp>.json)")
    g.add_argument("--plot", default=None, help="chart PNG (default: next to the JSON, same name)")
    g.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_prompts(args: argparse.Namespace) -> list[Prompt]:
    prompts: list[Prompt] = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        text = path.read_text(encoding="utf-8")
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".jsonl":
                obj = json.loads(line)
                if isinstance(obj, str):
                    prompts.append(obj)
                elif isinstance(obj, dict) and "messages" in obj:
                    prompts.append(obj["messages"])
                elif isinstance(obj, dict) and "prompt" in obj:
                    prompts.append(str(obj["prompt"]))
                else:
                    raise ValueError(f"{path}: cannot read a prompt from {line[:80]!r}")
            else:
                prompts.append(line)
    return prompts or list(DEFAULT_PROMPTS)


def _jsonable_args(args: argparse.Namespace) -> dict:
    out = {}
    for k, v in vars(args).items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            v = repr(v)
        out[k] = v
    return out


def _plan(args: argparse.Namespace) -> list[tuple[Optional[int], Optional[float], int]]:
    """(concurrency, request_rate, num_requests) for each run."""
    if args.request_rate is not None:
        if args.concurrency and len(args.concurrency) > 1:
            raise ValueError("with --request-rate, --concurrency is a single cap, not a list")
        cap = args.concurrency[0] if args.concurrency else None
        n = args.num_requests or (max(4 * cap, 16) if cap else max(16, math.ceil(10 * args.request_rate)))
        return [(cap, args.request_rate, n)]
    levels = args.concurrency or DEFAULT_CONCURRENCY
    return [(c, None, args.num_requests or max(4 * c, 16)) for c in levels]


async def _main(args: argparse.Namespace) -> int:
    base_url = args.base_url.rstrip("/")
    api_key = args.api_key or os.environ.get("CHATSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    try:
        plan = _plan(args)
        prompts = load_prompts(args)
        extra_body = json.loads(args.extra_body) if args.extra_body else None
        if extra_body is not None and not isinstance(extra_body, dict):
            raise ValueError("--extra-body must be a JSON object")
    except (ValueError, OSError) as e:
        print(f"chatserve bench: {e}", file=sys.stderr)
        return 2
    model = args.model
    if not model:
        try:
            model = await fetch_model(base_url, api_key, timeout=min(args.timeout or 30.0, 30.0))
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            print(f"chatserve bench: could not read the model list from {base_url}/models: {e}", file=sys.stderr)
            print("  (is the server up? does --base-url end in /v1? pass --model to skip this)", file=sys.stderr)
            return 2

    progress = not args.no_progress and sys.stderr.isatty()
    started = datetime.now(timezone.utc)
    print(f"benchmarking {model} at {base_url}: {len(plan)} run(s), max_tokens={args.max_tokens}", flush=True)
    runs = []
    for i, (c, rate, n) in enumerate(plan):
        summary = await run_load(
            base_url,
            model,
            c,
            n,
            args.max_tokens,
            prompts,
            request_rate=rate,
            temperature=args.temperature,
            ignore_eos=args.ignore_eos,
            api_key=api_key,
            warmup=args.warmup if i == 0 else 0,
            timeout=args.timeout,
            extra_body=extra_body,
            seed=args.seed,
            progress=progress,
        )
        runs.append(summary)
        print(
            f"  {run_label(summary)}: {summary['ok']}/{summary['num_requests']} ok, "
            f"{summary['output_throughput']:.1f} out tok/s, {summary['duration_s']:.2f}s",
            flush=True,
        )

    print()
    print(format_report(runs))
    print()

    stamp = started.astimezone().strftime("%Y%m%d-%H%M%S")
    out_path = Path(args.output) if args.output else Path("bench-results") / f"bench-{stamp}.json"
    doc = {
        "timestamp": started.isoformat(),
        "argv": sys.argv,
        "args": _jsonable_args(args),
        "base_url": base_url,
        "model": model,
        "runs": runs,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    print(f"results: {out_path}")
    if not args.no_plot:
        plot_path = Path(args.plot) if args.plot else out_path.with_suffix(".png")
        write_plot(runs, plot_path)
        print(f"chart:   {plot_path}")
    return 0 if any(r["ok"] for r in runs) else 1


def run(args: argparse.Namespace) -> int:
    """Entry point for ``chatserve bench``; returns the process exit code."""
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="chatserve bench", description=__doc__.split("\n\n")[0].replace("``", ""))
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
