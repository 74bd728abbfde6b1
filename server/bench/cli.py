"""``chatserve bench``'s command line: options, the plan of runs, and the JSON results file."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import httpx

from .load import DEFAULT_PROMPTS, Prompt, fetch_model, run_load
from .report import format_report, run_label, write_plot

DESCRIPTION = "chatserve bench: a load generator for any OpenAI-compatible chat endpoint."
DEFAULT_CONCURRENCY = [1, 8, 32]


def _concurrency_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
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
    g.add_argument(
        "--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI-compatible base URL (default: %(default)s)"
    )
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
    g.add_argument(
        "--warmup", type=int, default=1, help="unmeasured requests sent before the first run (default: %(default)s)"
    )
    g.add_argument("--seed", type=int, default=0, help="seed for Poisson arrival times (default: %(default)s)")
    g = parser.add_argument_group("requests")
    g.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default: %(default)s)")
    g.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="user prompt (repeatable; default: built-in long-answer prompts)",
    )
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
        help='send "ignore_eos": true and "min_tokens": max_tokens (chatserve, vLLM) so every answer is '
        "max_tokens long",
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


def _plan(args: argparse.Namespace) -> list[tuple[int | None, float | None, int]]:
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m server.bench``: the same options as ``chatserve bench``."""
    parser = argparse.ArgumentParser(prog="chatserve bench", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
