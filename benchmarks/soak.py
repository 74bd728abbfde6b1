"""Soak test (not in CI): a closed loop of mixed chat requests for a long time, with the server's RSS,
/health and latency sampled over time, every answer checked, a JSON report and a PNG plot.

    .venv/bin/python benchmarks/soak.py                                   # 30 min, c=16, own server
    .venv/bin/python benchmarks/soak.py --minutes 1 --concurrency 4        # a quick check
    .venv/bin/python benchmarks/soak.py --base-url http://127.0.0.1:8000 --pid 1234   # a running server

Unless ``--base-url`` is given it starts ``chatserve serve`` in a subprocess on a free loopback port
(default model SmolLM2-135M-Instruct, float32, CPU; extra flags with ``--server-args``) and stops it
at the end. Only loopback addresses are accepted.

The loop: ``--concurrency`` workers each keep one request in flight until ``--minutes`` have passed
(no new request starts after that; the ones in flight finish or hit ``--request-timeout``). Each
request is one of these kinds, drawn with the ``--mix`` weights:

  stream        streamed chat; must end with [DONE], carry usage, a valid finish_reason
  nonstream     the same, one JSON answer
  json_schema   response_format json_schema (a small object); the content must parse and validate
  tools         tools + tool_choice "required"; a call to get_weather with JSON arguments that
                validate against its parameters
  tools_stream  the same, streamed (tool_call deltas joined)
  stop          a counting prompt with a stop string (streamed or not, at random); it must be absent
  logprobs      logprobs + top_logprobs at temperature 0; one entry per token, each the max of its
                top_logprobs
  disconnect    a streamed request (max_tokens 128) whose client closes the connection after a few
                content chunks
  bad_image     (vision-language models; not in the default mix) an image part that is malformed
                base64 or bytes that are not an image, streamed or not: must be a 400 in OpenAI's
                error shape

With ``--images F`` (a vision-language model), a share F of the other requests carry one or two
data-URL PNG images before their text, drawn from 6 images of different colours and sizes (so the
prefix cache sees the same text with other images, and the same images again); their kind is reported as
KIND+img, checked as KIND.

Each request's record: kind, HTTP status, latency (send -> last byte, or -> close for a disconnect),
TTFT for streams, finish_reason, tokens, and its outcome: ok, or one of http_error (a non-200),
stream_error (an error event / no [DONE]), timeout, transport (connection errors), wrong_output
(a 200 whose content fails its check: a failure kind of its own) or client_error (a bug here), each
with a short reason.

Every ``--sample-s`` seconds a thread records the server's RSS (/proc/PID/status VmRSS), /health
(running, waiting, stats such as kv_blocks_used) and /health's own response time. After the loop it
waits up to ``--settle-s`` for running and waiting to go back to 0.

Writes bench-results/soak-<time>.json and .png (3 panels over time: RSS; latency p50/p95 per bucket,
overall and per kind; requests/s and failures) and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import jsonschema  # noqa: E402

from benchmarks.run_all import rss_mb, start_server, stop  # noqa: E402
from server.bench import percentile  # noqa: E402

KINDS = ("stream", "nonstream", "json_schema", "tools", "tools_stream", "stop", "logprobs", "disconnect", "bad_image")
DEFAULT_MIX = "stream=3,nonstream=2,json_schema=2,tools=2,tools_stream=1,stop=2,logprobs=1,disconnect=1"
STREAMED = {"stream", "tools_stream", "disconnect"}  # "stop" is streamed or not at random

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for learning to cook.",
    "Describe a sunrise over the mountains.",
    "What is the capital of France, and why is it famous?",
    "Tell me a short story about a robot who learns to paint.",
    "List some fruits that are red.",
    "How do airplanes stay in the air?",
]
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
JSON_PROMPTS = [
    "Invent a person and give their name and age as JSON.",
    "Describe a famous scientist as JSON with a name and an age.",
    "Make up a character for a novel; answer in JSON.",
]
TOOL_NAME = "get_weather"
TOOL_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
# one tool: with tool_choice "required" the server's grammar must produce a call to exactly this one
TOOLS = [
    {
        "type": "function",
        "function": {"name": TOOL_NAME, "description": "Get the current weather in a city", "parameters": TOOL_PARAMS},
    }
]
TOOL_PROMPTS = [
    "What's the weather like in Paris right now?",
    "Is it raining in Tokyo? Check the weather.",
    "Tell me the temperature in Berlin in fahrenheit.",
]
STOP_PROMPT = "Count from 1 to 20, one number per line."
STOP_STRINGS = ["7", "5", "\n9"]
TOP_LOGPROBS = 3


# --------------------------------------------------------------------------- #
# One request
# --------------------------------------------------------------------------- #


@dataclass
class Rec:
    kind: str
    stream: bool
    start_s: float  # since the loop began
    end_s: float = 0.0
    latency_s: float = 0.0  # send -> last byte (disconnect: -> close)
    ttft_s: float | None = None  # streams: send -> first content / tool-call chunk
    status: int | None = None
    outcome: str = "ok"  # ok | http_error | stream_error | timeout | transport | wrong_output | client_error
    reason: str | None = None
    detail: str | None = None
    finish_reason: str | None = None
    completion_tokens: int | None = None
    chunks: int = 0


def _png_data_url(rgb: tuple[int, int, int], size: tuple[int, int]) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


_IMAGES: list[str] = []


def images_pool() -> list[str]:
    if not _IMAGES:
        colours = [(200, 30, 30), (30, 160, 60), (40, 60, 200), (240, 200, 20), (90, 90, 90), (250, 250, 250)]
        sizes = [(32, 32), (64, 48), (48, 96)]
        _IMAGES.extend(_png_data_url(c, sizes[i % len(sizes)]) for i, c in enumerate(colours))
    return _IMAGES


BAD_IMAGES = ["data:image/png;base64,@@not*base64@@", "data:image/png;base64,aGVsbG8gd29ybGQ="]  # "hello world"


class Failed(Exception):
    def __init__(self, outcome: str, reason: str, detail: str = ""):
        super().__init__(f"{outcome}/{reason}: {detail}")
        self.outcome, self.reason, self.detail = outcome, reason, detail[:300]


def wrong(reason: str, detail: str = "") -> Failed:
    return Failed("wrong_output", reason, detail)


def build(kind: str, model: str, rng: random.Random, args) -> tuple[dict, dict]:
    """(payload, what the check needs) for one request of ``kind``."""
    mt = rng.randint(args.min_tokens, args.max_tokens)
    temp = rng.choice([0.0, 0.7])
    p: dict[str, Any] = {
        "model": model,
        "max_tokens": mt,
        "temperature": temp,
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
    }
    ctx: dict[str, Any] = {}
    if kind == "json_schema":
        p["messages"][0]["content"] = rng.choice(JSON_PROMPTS)
        p["max_tokens"] = args.max_tokens
        p["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
        }
    elif kind in ("tools", "tools_stream"):
        p["messages"][0]["content"] = rng.choice(TOOL_PROMPTS)
        p["max_tokens"] = args.max_tokens
        p["tools"], p["tool_choice"] = TOOLS, "required"
    elif kind == "stop":
        ctx["stop"] = rng.choice(STOP_STRINGS)
        p["messages"][0]["content"] = STOP_PROMPT
        p["max_tokens"] = args.max_tokens
        p["stop"] = [ctx["stop"], "twenty-one"]
    elif kind == "logprobs":
        p["temperature"] = 0.0
        p["logprobs"], p["top_logprobs"] = True, TOP_LOGPROBS
    elif kind == "disconnect":
        p["max_tokens"] = 128
        ctx["close_after"] = rng.randint(2, 5)
    if kind == "bad_image":
        urls = [rng.choice(BAD_IMAGES)]
    elif args.images and rng.random() < args.images:
        urls = rng.sample(images_pool(), rng.choice([1, 1, 2]))
    else:
        urls = []
    if urls:
        ctx["images"] = len(urls)
        text = p["messages"][0]["content"]
        p["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [
            {"type": "text", "text": text}
        ]
    stream = kind in STREAMED or (kind in ("stop", "bad_image") and rng.random() < 0.5)
    if stream:
        p["stream"] = True
        p["stream_options"] = {"include_usage": True}
    return p, ctx


async def read_stream(resp: httpx.Response, rec: Rec, t_send: float, close_after: int | None) -> dict:
    """Read an SSE stream into {"content", "tool_calls", "usage", "done"}; stops early (closing the
    connection) after ``close_after`` content chunks."""
    content: list[str] = []
    calls: dict[int, dict] = {}
    usage, done = None, False
    async for line in resp.aiter_lines():
        line = line.strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        try:
            obj = json.loads(data)
        except ValueError:
            raise Failed("stream_error", "bad_sse_json", data[:200]) from None
        if obj.get("error"):
            raise Failed("stream_error", "error_event", json.dumps(obj["error"])[:300])
        if obj.get("usage"):
            usage = obj["usage"]
        for ch in obj.get("choices") or []:
            d = ch.get("delta") or {}
            got = False
            if d.get("content"):
                content.append(d["content"])
                got = True
            for tc in d.get("tool_calls") or []:
                c = calls.setdefault(tc.get("index", 0), {"name": "", "arguments": ""})
                fn = tc.get("function") or {}
                c["name"] += fn.get("name") or ""
                c["arguments"] += fn.get("arguments") or ""
                got = True
            if got:
                rec.chunks += 1
                if rec.ttft_s is None:
                    rec.ttft_s = time.perf_counter() - t_send
            if ch.get("finish_reason"):
                rec.finish_reason = ch["finish_reason"]
        if close_after is not None and rec.chunks >= close_after:
            rec.finish_reason = "client_closed"
            break
    return {
        "content": "".join(content),
        "tool_calls": [calls[i] for i in sorted(calls)],
        "usage": usage,
        "done": done,
        "logprobs": None,
    }


async def send(client: httpx.AsyncClient, url: str, p: dict, rec: Rec, ctx: dict) -> dict:
    t_send = time.perf_counter()
    if p.get("stream"):
        async with client.stream("POST", url, json=p) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                raise Failed("http_error", f"http_{resp.status_code}", body)
            return await read_stream(resp, rec, t_send, ctx.get("close_after"))
    resp = await client.post(url, json=p)
    rec.status = resp.status_code
    if resp.status_code != 200:
        raise Failed("http_error", f"http_{resp.status_code}", resp.text)
    try:
        body = resp.json()
        ch = body["choices"][0]
        msg = ch["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise wrong("bad_body", resp.text[:300]) from None
    rec.finish_reason = ch.get("finish_reason")
    return {
        "content": msg.get("content") or "",
        "tool_calls": [
            {"name": (c.get("function") or {}).get("name"), "arguments": (c.get("function") or {}).get("arguments")}
            for c in msg.get("tool_calls") or []
        ],
        "usage": body.get("usage"),
        "done": True,
        "logprobs": ch.get("logprobs"),
    }


def check(kind: str, p: dict, ctx: dict, out: dict, rec: Rec) -> None:
    """Raise wrong_output / stream_error if the answer is not what ``kind`` asks for."""
    if kind == "disconnect":
        return  # closed by us: whatever came before the close is fine (an error event raised already)
    if not out["done"]:
        raise Failed("stream_error", "no_done", f"stream ended without [DONE] after {rec.chunks} chunks")
    usage = out["usage"]
    if not usage or usage.get("completion_tokens") is None:
        raise wrong("no_usage")
    rec.completion_tokens = usage["completion_tokens"]
    if rec.completion_tokens > p["max_tokens"]:
        raise wrong("too_many_tokens", f"{rec.completion_tokens} > max_tokens {p['max_tokens']}")
    if rec.finish_reason not in ("stop", "length", "tool_calls"):
        raise wrong("bad_finish_reason", repr(rec.finish_reason))
    text = out["content"]
    if kind == "json_schema":
        try:
            obj = json.loads(text)
        except ValueError:
            raise wrong("json_truncated" if rec.finish_reason == "length" else "json_invalid", text) from None
        try:
            jsonschema.validate(obj, PERSON_SCHEMA)
        except jsonschema.ValidationError as e:
            raise wrong("schema_mismatch", f"{e.message}: {text}") from None
    elif kind in ("tools", "tools_stream"):
        if not out["tool_calls"]:
            raise wrong("no_tool_call", f"finish={rec.finish_reason} content={text!r}")
        call = out["tool_calls"][0]
        if call["name"] != TOOL_NAME:
            raise wrong("wrong_tool", repr(call["name"]))
        try:
            argv = json.loads(call["arguments"] or "")
        except (ValueError, TypeError):
            raise wrong("tool_args_not_json", repr(call["arguments"])) from None
        try:
            jsonschema.validate(argv, TOOL_PARAMS)
        except jsonschema.ValidationError as e:
            raise wrong("tool_args_schema", f"{e.message}: {call['arguments']}") from None
    elif kind == "stop":
        if ctx["stop"] in text:
            raise wrong("stop_string_present", f"{ctx['stop']!r} in {text!r}")
    elif kind == "logprobs":
        entries = (out["logprobs"] or {}).get("content")
        if not entries:
            raise wrong("no_logprobs")
        # one entry per content token: an end-of-sequence token (finish "stop") counts in usage but
        # is not content, so it has none (the 30-minute run of 2026-11-26 flagged those 6 times)
        eos = 1 if rec.finish_reason == "stop" else 0
        if len(entries) != rec.completion_tokens - eos:
            raise wrong("logprobs_count", f"{len(entries)} entries for {rec.completion_tokens} tokens")
        for i, e in enumerate(entries):
            tops = e.get("top_logprobs") or []
            if len(tops) != TOP_LOGPROBS:
                raise wrong("top_logprobs_count", f"token {i}: {len(tops)} top_logprobs")
            if e["logprob"] < max(t["logprob"] for t in tops) - 1e-3:
                raise wrong("logprob_not_max", f"token {i}: {e['logprob']} < max of {tops}")
    if kind in ("stream", "nonstream", "stop", "logprobs") and rec.completion_tokens > 0 and not text:
        raise wrong("empty_content", f"{rec.completion_tokens} tokens but no content")


async def refused(client: httpx.AsyncClient, url: str, p: dict, rec: Rec) -> None:
    """A bad image must be a 400 with an OpenAI-shaped error (a message and a type), streamed or not."""
    resp = await client.post(url, json=p)
    rec.status = resp.status_code
    if resp.status_code != 400:
        raise wrong("bad_image_not_400", f"{resp.status_code}: {resp.text[:200]}")
    try:
        err = resp.json()["error"]
        ok = bool(err["message"]) and bool(err["type"])
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise wrong("bad_error_shape", resp.text[:300])
    rec.finish_reason = "refused"


async def one(client: httpx.AsyncClient, url: str, kind: str, model: str, rng: random.Random, args, t0: float) -> Rec:
    p, ctx = build(kind, model, rng, args)
    start = time.perf_counter()
    label = f"{kind}+img" if ctx.get("images") and kind != "bad_image" else kind
    rec = Rec(kind=label, stream=bool(p.get("stream")), start_s=start - t0)
    try:
        if kind == "bad_image":
            await asyncio.wait_for(refused(client, url, p, rec), args.request_timeout)
        else:
            out = await asyncio.wait_for(send(client, url, p, rec, ctx), args.request_timeout)
            check(kind, p, ctx, out, rec)
    except Failed as f:
        rec.outcome, rec.reason, rec.detail = f.outcome, f.reason, f.detail
    except (asyncio.TimeoutError, httpx.TimeoutException) as e:
        rec.outcome, rec.reason, rec.detail = "timeout", type(e).__name__, str(e)[:300]
    except (httpx.HTTPError, OSError) as e:
        rec.outcome, rec.reason, rec.detail = "transport", type(e).__name__, str(e)[:300]
    except Exception as e:  # a bug in this script must not stop the soak
        rec.outcome, rec.reason, rec.detail = "client_error", type(e).__name__, repr(e)[:300]
    end = time.perf_counter()
    rec.end_s, rec.latency_s = end - t0, end - start
    return rec


# --------------------------------------------------------------------------- #
# The loop and the sampler
# --------------------------------------------------------------------------- #


def health_sample(client: httpx.Client, health_url: str, pid: int | None, t0: float) -> dict:
    s: dict[str, Any] = {"t": time.perf_counter() - t0, "rss_mb": None}
    if pid:
        try:
            s["rss_mb"] = rss_mb(pid)
        except OSError:
            pass
    t = time.perf_counter()
    try:
        r = client.get(health_url)
        s["health_s"] = time.perf_counter() - t
        s["health_status"] = r.status_code
        j = r.json()
        s["running"], s["waiting"] = j.get("running"), j.get("waiting")
        s["stats"] = j.get("stats") or {}
    except (httpx.HTTPError, ValueError) as e:
        s["health_s"] = time.perf_counter() - t
        s["health_error"] = f"{type(e).__name__}: {e}"[:200]
    return s


def sampler(
    stop_evt: threading.Event, samples: list, health_url: str, pid: int | None, t0: float, interval: float, proc
) -> None:
    with httpx.Client(timeout=10, trust_env=False) as c:
        while True:
            samples.append(health_sample(c, health_url, pid, t0))
            if proc is not None and proc.poll() is not None:
                samples[-1]["server_exited"] = proc.returncode
                stop_evt.set()
                return
            if stop_evt.wait(interval):
                return


async def soak(url: str, model: str, args, t0: float, deadline: float, server_gone: threading.Event) -> list[Rec]:
    kinds, weights = zip(*args.mix_weights.items())
    recs: list[Rec] = []
    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(args.request_timeout, connect=10), limits=limits, trust_env=False
    ) as client:

        async def worker(i: int) -> None:
            rng = random.Random(args.seed * 1000 + i)
            while time.perf_counter() < deadline and not server_gone.is_set():
                kind = rng.choices(kinds, weights)[0]
                rec = await one(client, url, kind, model, rng, args, t0)
                recs.append(rec)
                if rec.outcome in ("transport", "timeout"):
                    await asyncio.sleep(0.5)  # no hot loop against a server that is down

        await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
    return recs


async def warm_up(url: str, model: str, args) -> list[Rec]:
    """One request of each kind in the mix, one at a time (compiles the schema and tool grammars)."""
    rng = random.Random(args.seed - 1)
    out = []
    async with httpx.AsyncClient(timeout=args.request_timeout, trust_env=False) as client:
        t0 = time.perf_counter()
        for kind in args.mix_weights:
            out.append(await one(client, url, kind, model, rng, args, t0))
    return out


# --------------------------------------------------------------------------- #
# Figures
# --------------------------------------------------------------------------- #


def pct(vals, q) -> float | None:
    return percentile(list(vals), q) if vals else None


def ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1000:.0f}"


def buckets(recs: list[Rec], duration: float, width: float) -> list[dict]:
    n = max(1, int(-(-duration // width)))
    rows = []
    for b in range(n):
        lo, hi = b * width, (b + 1) * width
        inb = [r for r in recs if lo <= r.end_s < hi or (b == n - 1 and r.end_s >= hi)]
        ok = [r for r in inb if r.outcome == "ok"]
        span = min(hi, max(duration, lo + 1e-9)) - lo if b == n - 1 else width
        row = {
            "t0_s": lo,
            "t1_s": hi,
            "requests": len(inb),
            "ok": len(ok),
            "failed": len(inb) - len(ok),
            "ok_per_s": len(ok) / max(span, 1e-9),
            "p50_s": pct([r.latency_s for r in ok], 50),
            "p95_s": pct([r.latency_s for r in ok], 95),
            "by_kind": {},
        }
        for k in sorted({r.kind for r in ok}):
            lat = [r.latency_s for r in ok if r.kind == k]
            row["by_kind"][k] = {"n": len(lat), "p50_s": pct(lat, 50), "p95_s": pct(lat, 95)}
        rows.append(row)
    return rows


def nearest(samples: list[dict], t: float) -> dict | None:
    good = [s for s in samples if s.get("rss_mb") is not None]
    return min(good, key=lambda s: abs(s["t"] - t)) if good else None


def slope_mb_per_min(samples: list[dict], t_from: float) -> float | None:
    pts = [(s["t"] / 60, s["rss_mb"]) for s in samples if s.get("rss_mb") is not None and s["t"] >= t_from]
    if len(pts) < 3:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else None


def summarize(recs: list[Rec], samples: list[dict], duration: float, settle: dict, window: float) -> dict:
    ok = [r for r in recs if r.outcome == "ok"]
    by_kind = {}
    for k in sorted({r.kind for r in recs}):
        rs = [r for r in recs if r.kind == k]
        oks = [r for r in rs if r.outcome == "ok"]
        by_kind[k] = {
            "requests": len(rs),
            "ok": len(oks),
            "failed": len(rs) - len(oks),
            "p50_s": pct([r.latency_s for r in oks], 50),
            "p95_s": pct([r.latency_s for r in oks], 95),
            "ttft_p50_s": pct([r.ttft_s for r in oks if r.ttft_s is not None], 50),
            "finish_reasons": dict(Counter(str(r.finish_reason) for r in oks)),
        }
    fails = Counter(f"{r.kind} {r.outcome}/{r.reason}" for r in recs if r.outcome != "ok")
    examples = {}
    for r in recs:
        key = f"{r.kind} {r.outcome}/{r.reason}"
        if r.outcome != "ok" and key not in examples:
            examples[key] = r.detail

    in_run = [s for s in samples if s["t"] <= duration + 1e-6 and s.get("rss_mb") is not None]
    rss: dict[str, Any] = {}
    if in_run:
        start, mid, end = in_run[0], nearest(in_run, duration / 2), in_run[-1]
        rss = {
            "start_mb": start["rss_mb"],
            "middle_mb": mid["rss_mb"],
            "end_mb": end["rss_mb"],
            "max_mb": max(s["rss_mb"] for s in in_run),
            "growth_mb": end["rss_mb"] - start["rss_mb"],
            "growth_pct": 100 * (end["rss_mb"] - start["rss_mb"]) / start["rss_mb"],
            "second_half_slope_mb_per_min": slope_mb_per_min(in_run, duration / 2),
        }
    if settle.get("rss_mb") is not None:
        rss["after_settle_mb"] = settle["rss_mb"]

    first = [r for r in ok if r.start_s < window]
    last = [r for r in ok if r.start_s >= duration - window]
    lat_fl = {
        "window_s": window,
        "first": {
            "n": len(first),
            "p50_s": pct([r.latency_s for r in first], 50),
            "p95_s": pct([r.latency_s for r in first], 95),
        },
        "last": {
            "n": len(last),
            "p50_s": pct([r.latency_s for r in last], 50),
            "p95_s": pct([r.latency_s for r in last], 95),
        },
        "by_kind": {},
    }
    for k in by_kind:
        f = [r.latency_s for r in first if r.kind == k]
        la = [r.latency_s for r in last if r.kind == k]
        lat_fl["by_kind"][k] = {
            "first_p50_s": pct(f, 50),
            "first_p95_s": pct(f, 95),
            "last_p50_s": pct(la, 50),
            "last_p95_s": pct(la, 95),
        }

    hs = [s for s in samples if s.get("health_s") is not None and s.get("health_status") == 200]
    health = {
        "samples": len(samples),
        "ok_samples": len(hs),
        "errors": sum(1 for s in samples if "health_error" in s or s.get("health_status") not in (200, None)),
        "max_s": max((s["health_s"] for s in hs), default=None),
        "p50_s": pct([s["health_s"] for s in hs], 50),
        "max_running": max((s.get("running") or 0 for s in hs), default=None),
        "max_waiting": max((s.get("waiting") or 0 for s in hs), default=None),
        "max_kv_blocks_used": max((s["stats"].get("kv_blocks_used", 0) for s in hs), default=None),
    }
    return {
        "duration_s": duration,
        "requests": len(recs),
        "ok": len(ok),
        "failed": len(recs) - len(ok),
        "ok_per_s": len(ok) / max(duration, 1e-9),
        "p50_s": pct([r.latency_s for r in ok], 50),
        "p95_s": pct([r.latency_s for r in ok], 95),
        "disconnects_mid_stream": sum(1 for r in recs if r.finish_reason == "client_closed"),
        "by_kind": by_kind,
        "failures": dict(fails.most_common()),
        "failure_examples": examples,
        "rss": rss,
        "latency_first_vs_last": lat_fl,
        "health": health,
        "settle": settle,
    }


def print_summary(s: dict, args) -> None:
    print(
        f"\n== soak summary: {s['duration_s'] / 60:.1f} min at c={args.concurrency}: {s['requests']} requests, "
        f"{s['ok']} ok, {s['failed']} failed, {s['ok_per_s']:.2f} ok req/s, "
        f"latency p50 {ms(s['p50_s'])} ms p95 {ms(s['p95_s'])} ms"
    )
    print(
        f"   {'kind':<13}{'requests':>9}{'ok':>6}{'failed':>7}{'p50 ms':>8}{'p95 ms':>8}{'TTFT p50':>9}  finish reasons"
    )
    for k, v in s["by_kind"].items():
        print(
            f"   {k:<13}{v['requests']:>9}{v['ok']:>6}{v['failed']:>7}{ms(v['p50_s']):>8}{ms(v['p95_s']):>8}"
            f"{ms(v['ttft_p50_s']):>9}  {v['finish_reasons']}"
        )
    print(f"   disconnects that closed mid-stream: {s['disconnects_mid_stream']}")
    if s["failures"]:
        print("   failures by kind and outcome/reason:")
        for key, n in s["failures"].items():
            print(f"     {n:>5}  {key}   e.g. {s['failure_examples'].get(key)!r:.160}")
    else:
        print("   failures: none")
    r = s["rss"]
    if r:
        slope = r.get("second_half_slope_mb_per_min")
        print(
            f"   RSS: start (after warm-up) {r['start_mb']:.0f} MB, middle {r['middle_mb']:.0f} MB, "
            f"end {r['end_mb']:.0f} MB, max {r['max_mb']:.0f} MB; growth {r['growth_mb']:+.1f} MB "
            f"({r['growth_pct']:+.1f}%); 2nd-half slope "
            f"{'n/a' if slope is None else f'{slope:+.2f} MB/min'}"
            + (f"; after settle {r['after_settle_mb']:.0f} MB" if "after_settle_mb" in r else "")
        )
    else:
        print("   RSS: not sampled (no server PID; pass --pid with --base-url)")
    fl = s["latency_first_vs_last"]
    w = fl["window_s"]
    print(
        f"   latency, first {w:.0f} s vs last {w:.0f} s (ok requests by start time): "
        f"p50 {ms(fl['first']['p50_s'])} -> {ms(fl['last']['p50_s'])} ms, "
        f"p95 {ms(fl['first']['p95_s'])} -> {ms(fl['last']['p95_s'])} ms "
        f"(n {fl['first']['n']} / {fl['last']['n']})"
    )
    for k, v in fl["by_kind"].items():
        print(
            f"     {k:<13} p50 {ms(v['first_p50_s']):>6} -> {ms(v['last_p50_s']):>6} ms, "
            f"p95 {ms(v['first_p95_s']):>6} -> {ms(v['last_p95_s']):>6} ms"
        )
    h = s["health"]
    print(
        f"   /health: {h['samples']} samples, {h['errors']} errors, response p50 {ms(h['p50_s'])} ms, "
        f"max {ms(h['max_s'])} ms; max running {h['max_running']}, max waiting {h['max_waiting']}, "
        f"max kv_blocks_used {h['max_kv_blocks_used']}"
    )
    st = s["settle"]
    if st.get("idle"):
        print(
            f"   after the run: running={st['running']} waiting={st['waiting']} "
            f"(back to 0 {st['after_s']:.1f} s after the last request ended), kv_blocks_used={st.get('kv_blocks_used')}"
        )
    else:
        print(
            f"   after the run: NOT idle within {args.settle_s:.0f} s: running={st.get('running')} "
            f"waiting={st.get('waiting')} {st.get('error', '')}"
        )


def plot(path: Path, recs: list[Rec], samples: list[dict], rows: list[dict], duration: float, args, s: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(12, 11), sharex=True)
    fig.suptitle(
        f"chatserve soak: c={args.concurrency}, {duration / 60:.1f} min, {s['requests']} requests "
        f"({s['failed']} failed), mix {args.mix}",
        fontsize=10,
    )
    # 1: RSS, with running + waiting behind it
    xs = [x["t"] / 60 for x in samples if x.get("rss_mb") is not None]
    ys = [x["rss_mb"] for x in samples if x.get("rss_mb") is not None]
    if xs:
        a1.plot(xs, ys, "o-", ms=3, color="tab:blue", label="server RSS (MB)")
        lo, hi = min(ys), max(ys)
        a1.set_ylim(lo - max(20, (hi - lo) * 0.5), hi + max(20, (hi - lo) * 0.5))
    else:
        a1.text(0.5, 0.5, "RSS not sampled (no server PID)", transform=a1.transAxes, ha="center")
    r = s["rss"]
    a1.set_ylabel("RSS (MB)")
    a1.set_title(
        "server RSS" + (f": {r['start_mb']:.0f} -> {r['end_mb']:.0f} MB ({r['growth_mb']:+.1f} MB)" if r else ""),
        fontsize=10,
    )
    b1 = a1.twinx()
    hx = [x["t"] / 60 for x in samples if x.get("running") is not None]
    b1.step(
        hx,
        [x["running"] for x in samples if x.get("running") is not None],
        where="post",
        color="grey",
        alpha=0.6,
        label="/health running",
    )
    b1.step(
        hx,
        [x["waiting"] for x in samples if x.get("running") is not None],
        where="post",
        color="orange",
        alpha=0.6,
        label="/health waiting",
    )
    b1.set_ylabel("sequences")
    b1.set_ylim(bottom=0)
    h1, l1 = a1.get_legend_handles_labels()
    h2, l2 = b1.get_legend_handles_labels()
    a1.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    # 2: latency per bucket
    mid = [(row["t0_s"] + min(row["t1_s"], duration)) / 2 / 60 for row in rows]
    a2.plot(mid, [row["p50_s"] for row in rows], "o-", color="black", lw=2, label="all kinds p50")
    a2.plot(mid, [row["p95_s"] for row in rows], "s--", color="black", lw=2, label="all kinds p95")
    for k in sorted({k for row in rows for k in row["by_kind"]}):
        a2.plot(mid, [row["by_kind"].get(k, {}).get("p50_s") for row in rows], ".-", lw=1, alpha=0.7, label=f"{k} p50")
    a2.set_ylabel("latency (s)")
    top = max(
        (v for row in rows for v in [row["p95_s"]] + [k["p50_s"] for k in row["by_kind"].values()] if v is not None),
        default=1.0,
    )
    a2.set_ylim(0, top * 1.45)  # room for the legend above the lines
    a2.set_title(f"request latency (send -> last byte) per {args.bucket_s:.0f} s bucket, ok requests", fontsize=10)
    a2.legend(fontsize=7, ncol=5, loc="upper left")
    # 3: throughput and failures
    width = args.bucket_s / 60
    a3.plot(mid, [row["ok_per_s"] for row in rows], "o-", color="tab:green", label="ok requests/s")
    a3.set_ylabel("ok requests/s")
    a3.set_ylim(bottom=0)
    b3 = a3.twinx()
    b3.bar(
        [row["t0_s"] / 60 for row in rows],
        [row["failed"] for row in rows],
        width=width * 0.9,
        align="edge",
        color="tab:red",
        alpha=0.4,
        label="failed requests",
    )
    b3.set_ylabel("failed per bucket")
    b3.set_ylim(0, max(1, max((row["failed"] for row in rows), default=0)) * 1.3)
    h1, l1 = a3.get_legend_handles_labels()
    h2, l2 = b3.get_legend_handles_labels()
    a3.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    a3.set_title("throughput and failures", fontsize=10)
    a3.set_xlabel("minutes since the loop began")
    for a in (a1, a2, a3):
        a.grid(alpha=0.3)
        # after the deadline no new request starts: the last bucket holds only the tail
        a.axvline(args.minutes, color="purple", ls=":", lw=1)
    a3.text(args.minutes, 0.92, " deadline", color="purple", fontsize=8, transform=a3.get_xaxis_transform())
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #


def parse_mix(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        k, _, w = part.partition("=")
        k = k.strip()
        if k not in KINDS:
            raise SystemExit(f"--mix: unknown kind {k!r}; kinds: {', '.join(KINDS)}")
        out[k] = float(w or 1)
    out = {k: w for k, w in out.items() if w > 0}
    if not out:
        raise SystemExit("--mix: no kind has a weight > 0")
    return out


def wait_idle(health_url: str, pid: int | None, timeout: float) -> dict:
    t = time.perf_counter()
    last: dict[str, Any] = {}
    with httpx.Client(timeout=10, trust_env=False) as c:
        while True:
            s = health_sample(c, health_url, pid, t)
            last = {
                "running": s.get("running"),
                "waiting": s.get("waiting"),
                "kv_blocks_used": (s.get("stats") or {}).get("kv_blocks_used"),
                "rss_mb": s.get("rss_mb"),
                "after_s": time.perf_counter() - t,
            }
            if "health_error" in s:
                last["error"] = s["health_error"]
            if s.get("running") == 0 and s.get("waiting") == 0:
                last["idle"] = True
                return last
            if time.perf_counter() - t > timeout:
                last["idle"] = False
                return last
            time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--mix", default=DEFAULT_MIX, help=f"kind=weight,... (default {DEFAULT_MIX})")
    ap.add_argument("--min-tokens", type=int, default=16, help="max_tokens is drawn in [min, max] for plain kinds")
    ap.add_argument("--max-tokens", type=int, default=48, help="and used as is for json_schema, tools, stop")
    ap.add_argument("--request-timeout", type=float, default=120.0, help="seconds, each request in all")
    ap.add_argument(
        "--sample-s",
        type=float,
        default=0.0,
        help="RSS + /health sample interval (default: 5 s, 2 s for runs under 5 min)",
    )
    ap.add_argument(
        "--bucket-s",
        type=float,
        default=0.0,
        help="latency/throughput bucket (default: 60 s, 10 s for runs under 5 min)",
    )
    ap.add_argument("--settle-s", type=float, default=30.0, help="how long to wait for running/waiting to be 0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--images", type=float, default=0.0, help="share of requests that carry images (a vision-language model)"
    )
    ap.add_argument("--base-url", help="a running server (loopback only), e.g. http://127.0.0.1:8000")
    ap.add_argument("--pid", type=int, help="with --base-url: the server's PID, for RSS")
    ap.add_argument("--model", default=None, help="model spec for the server started here")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--server-args", default="", help="extra `chatserve serve` flags")
    ap.add_argument("--out-dir", default=str(ROOT / "bench-results"))
    args = ap.parse_args()
    args.mix_weights = parse_mix(args.mix)
    short = args.minutes < 5
    args.sample_s = args.sample_s or (2.0 if short else 5.0)
    args.bucket_s = args.bucket_s or (10.0 if short else 60.0)

    proc = None
    if args.base_url:
        host = urlparse(args.base_url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit(f"--base-url must be a loopback address, not {host!r}")
        root = args.base_url.rstrip("/").removesuffix("/v1")
        pid = args.pid
    else:
        proc, port = start_server(args.server_args.split(), args.model, args.dtype)
        root, pid = f"http://127.0.0.1:{port}", proc.pid
    url, health_url = root + "/v1/chat/completions", root + "/health"
    report: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items()},
        "base_url": root,
        "pid": pid,
        "machine": os.uname().nodename,
        "cpus": os.cpu_count(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        with httpx.Client(timeout=30, trust_env=False) as c:
            model = c.get(root + "/v1/models").json()["data"][0]["id"]
        report["model"] = model
        print(f">> warm-up: one request of each kind ({', '.join(args.mix_weights)})")
        warm = asyncio.run(warm_up(url, model, args))
        for r in warm:
            print(
                f"   {r.kind:<13} {r.outcome:<12} {r.latency_s * 1000:6.0f} ms"
                + (f"  {r.reason}: {r.detail!r:.120}" if r.outcome != "ok" else "")
            )
        report["warmup"] = [asdict(r) for r in warm]

        print(f">> soak: {args.minutes:g} min at c={args.concurrency}, mix {args.mix}")
        samples: list[dict] = []
        stop_evt, t0 = threading.Event(), time.perf_counter()
        deadline = t0 + args.minutes * 60
        th = threading.Thread(
            target=sampler, args=(stop_evt, samples, health_url, pid, t0, args.sample_s, proc), daemon=True
        )
        th.start()
        recs = asyncio.run(soak(url, model, args, t0, deadline, stop_evt))
        duration = time.perf_counter() - t0  # the last request's end (in-flight ones finish past the deadline)
        stop_evt.set()
        th.join(timeout=15)
        if proc is not None and proc.poll() is not None:
            report["server_exited"] = proc.returncode
            print(f"!! the server exited with code {proc.returncode} during the run")
            settle = {"idle": False, "error": "server exited"}
        else:
            settle = wait_idle(health_url, pid, args.settle_s)
    finally:
        if proc is not None:
            stop(proc)

    window = min(300.0, duration / 3)
    summary = summarize(recs, samples, duration, settle, window)
    rows = buckets(recs, duration, args.bucket_s)
    report.update(summary=summary, buckets=rows, samples=samples, records=[asdict(r) for r in recs])
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    json_path.write_text(json.dumps(report, indent=1, default=str))
    plot(png_path, recs, samples, rows, duration, args, summary)
    print_summary(summary, args)
    print(f">> wrote {json_path}\n>> wrote {png_path}")
    return 0 if summary["failed"] == 0 and settle.get("idle") else 1  # 1: failures, or not idle after


if __name__ == "__main__":
    sys.exit(main())
