"""Prefix caching: the same load with the prefix cache on and off, on the same machine, in one run.

Every request shares one long system prompt (as LAN clients of one deployment do) and asks its
own question. For each setting a fresh `chatserve serve` runs `chatserve bench`'s closed loop at
each concurrency (streaming, ignore_eos, --max-tokens tokens each) and reports TTFT, throughput
and how many prompt tokens the engine prefilled; then the on/off ratios.

    .venv/bin/python benchmarks/prefix_cache.py                 # c=1 and c=8, 32 tokens
    .venv/bin/python benchmarks/prefix_cache.py --concurrency 1,8,32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_all import measured_run, start_server, write_report  # noqa: E402

SYSTEM = " ".join(
    f"Rule {i}: when a customer asks about order {1000 + 37 * i}, check the warehouse in "
    f"{['Lyon', 'Oslo', 'Porto', 'Graz', 'Turku'][i % 5]} first and answer politely in one short paragraph."
    for i in range(24)
)
QUESTIONS = [
    "Where is my order?",
    "Can I change the delivery address?",
    "Do you ship to Iceland?",
    "How do I return a broken kettle?",
    "What are your opening hours?",
    "Is there a student discount?",
    "Can I pay by bank transfer?",
    "Why was I charged twice?",
    "How long does shipping take?",
    "Can I cancel my order?",
    "Do you sell gift cards?",
    "Who do I call about a missing parcel?",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests-per-run", type=int, default=0, help="default: max(2*c, 12)")
    args = ap.parse_args()
    conc = [int(c) for c in args.concurrency.split(",")]
    prompts = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]
    report: dict = {"args": vars(args), "settings": {}}
    import httpx

    for label, flags in (("off", ["--no-prefix-cache"]), ("on", [])):
        proc, port = start_server(["--max-running", str(max(conc))] + flags, args.model)
        base = f"http://127.0.0.1:{port}/v1"
        try:
            model = httpx.get(base + "/models").json()["data"][0]["id"]
            runs = []
            for c in conc:
                n = args.requests_per_run or max(2 * c, 12)
                s, moved = measured_run(port, model, c, n, args.max_tokens, prompts, warmup=1 if c == conc[0] else 0)
                prefilled = moved.get("prefill_tokens", 0)
                runs.append(
                    {
                        "concurrency": c,
                        "ok": s["ok"],
                        "failed": s["failed"],
                        "output_throughput": s["output_throughput"],
                        "ttft_ms": s["ttft_ms"],
                        "prompt_tokens": s["total_prompt_tokens"],
                        "prefilled_tokens": prefilled,
                    }
                )
                print(
                    f"   prefix cache {label:>3} c={c:>2}: {s['ok']} ok, {s['output_throughput']:.1f} tok/s, "
                    f"TTFT p50 {s['ttft_ms']['p50']:.0f} ms, prompt tokens {s['total_prompt_tokens']}, "
                    f"prefilled {prefilled}"
                )
            report["settings"][label] = runs
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    ratios = {}
    for off, on in zip(report["settings"]["off"], report["settings"]["on"]):
        c = off["concurrency"]
        ratios[f"c{c}_ttft_p50_off_over_on"] = off["ttft_ms"]["p50"] / on["ttft_ms"]["p50"]
        ratios[f"c{c}_throughput_on_over_off"] = on["output_throughput"] / off["output_throughput"]
    report["ratios"] = ratios
    print(">> ratios:", json.dumps(ratios, indent=2))
    write_report("prefix-cache", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
