"""Report: the text tables printed after a run and the PNG chart of its summaries."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .stats import PERCENTILES


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
            lrows.append([run_label(r), name, _fmt(s["mean"]), *(_fmt(s[f"p{p}"]) for p in PERCENTILES), str(s["n"])])
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
