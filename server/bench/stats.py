"""Metrics: percentiles and the summary of one run's per-request results."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .load import RequestResult

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float | None:
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
