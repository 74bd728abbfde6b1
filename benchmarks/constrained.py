"""Constrained vs unconstrained decoding speed, and constraint compile times, in one run.

    .venv/bin/python benchmarks/constrained.py            # SmolLM2-135M-Instruct, float32, CPU

Decode speed is time per output token after the first (TPOT), median over --repeats runs of the
same prompt through the engine API: unconstrained (min_tokens = the constrained run's length, so
both make the same number of tokens) against response_format json_schema. Compile times are for a
fresh ConstraintCompiler (first use, including the once-per-model vocabulary) and cached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_all import write_report  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "hobbies": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "colour", "hobbies"],
}


def tool(i: int) -> dict:
    return {
        "name": f"tool_{i}",
        "description": f"Tool number {i}",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    }


async def timed(engine, ids, params, constraint=None):
    from engine.request import GenerationRequest

    first = None
    n = 0
    text = ""
    async for ev in engine.generate(GenerationRequest("b", ids, params, constraint=constraint)):
        if first is None:
            first = time.perf_counter()
        n = ev.completion_tokens
        text += ev.text
    end = time.perf_counter()
    return n, (end - first) / max(1, n - 1), text


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    from engine.constraints import ConstraintCompiler
    from engine.engine import Engine
    from engine.loader import load_model
    from engine.request import ConstraintSpec, SamplingParams

    engine = Engine(load_model(args.model, device="cpu", dtype="float32")).start()
    report: dict = {}
    try:
        # compile times on a fresh compiler (the engine's own is used for decoding below)
        t = time.perf_counter()
        comp = ConstraintCompiler(engine.tokenizer, vocab_size=engine.vocab_size, eos_token_ids=engine.eos_ids)
        report["vocabulary_build_s"] = time.perf_counter() - t
        print(f"outlines vocabulary (once per model): {report['vocabulary_build_s']:.2f} s")
        specs = {
            "small_schema": ConstraintSpec(kind="json_schema", schema=SCHEMA),
            "tools_3": ConstraintSpec(kind="tools", tools=[tool(i) for i in range(3)], tool_choice="required"),
            "tools_12": ConstraintSpec(kind="tools", tools=[tool(i) for i in range(12)], tool_choice="required"),
        }
        for name, spec in specs.items():
            t = time.perf_counter()
            comp.compile(spec, timeout=120)
            first = time.perf_counter() - t
            t = time.perf_counter()
            comp.compile(spec, timeout=120)
            cached = time.perf_counter() - t
            report[f"compile_{name}_first_s"] = first
            report[f"compile_{name}_cached_ms"] = cached * 1000
            print(f"compile {name:13s} first {first:7.3f} s   cached {cached * 1000:7.3f} ms")

        ids = engine.render_prompt(
            [{"role": "user", "content": "Describe a person as JSON with name, age, favourite colour and hobbies."}]
        )
        compiled = engine.compile_constraint(specs["small_schema"], timeout=120)
        greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens)
        con, unc, lengths = [], [], []
        for _ in range(args.repeats):
            n, tpot, text = asyncio.run(timed(engine, ids, greedy, compiled.new_state()))
            json.loads(text)
            lengths.append(n)
            con.append(tpot)
            _, tpot_u, _ = asyncio.run(timed(engine, ids, greedy.replace(min_tokens=n, max_tokens=n)))
            unc.append(tpot_u)
        report.update(
            constrained_tokens=lengths[0],
            constrained_tpot_ms=statistics.median(con) * 1000,
            unconstrained_tpot_ms=statistics.median(unc) * 1000,
        )
        report["constrained_vs_unconstrained_tok_s"] = statistics.median(unc) / statistics.median(con)
        print(
            f"decode ({lengths[0]} tokens, median of {args.repeats}): constrained "
            f"{1 / statistics.median(con):.1f} tok/s, unconstrained {1 / statistics.median(unc):.1f} tok/s, "
            f"ratio {report['constrained_vs_unconstrained_tok_s']:.3f}x"
        )
    finally:
        engine.stop()
    write_report("constrained", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
