"""The engine's host work per decode step, with the model made almost free: a tiny random Llama
(tests/tiny_models.py) on CPU, c rows decoding together. On a GPU the forward of a big model runs
asynchronously, but everything else here (scheduling, step metadata, sampling ops, detokenizing,
stop strings, events) runs on the host between steps and adds to every step.

    .venv/bin/python benchmarks/host_overhead.py                       # c=64, 200 tokens each, 3 runs
    .venv/bin/python benchmarks/host_overhead.py --graphs emulate      # the CUDA-graph path's buffers
    .venv/bin/python benchmarks/host_overhead.py --profile             # + cProfile of the steps

Prints per run: tokens/s, and per decode step the engine's own counters in ms (step, forward,
sample, postprocess).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--graphs", choices=["off", "emulate"], default="off")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--profile", action="store_true", help="cProfile 200 steps of the last run")
    args = ap.parse_args()

    import torch
    from tiny_models import build_tiny_llama

    from engine.engine import Engine, EngineConfig
    from engine.loader import load_model
    from engine.request import GenerationRequest, SamplingParams

    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="chatserve-host-"))
    build_tiny_llama(folder)
    lm = load_model(str(folder), device="cpu", dtype="float32")
    tok = lm.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "hello there how are you"}], add_generation_prompt=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)

    for run in range(args.runs):
        eng = Engine(lm, EngineConfig(max_running=args.concurrency, decode_graphs=args.graphs))
        prof = cProfile.Profile() if args.profile and run == args.runs - 1 else None
        if prof is not None:
            step, count = eng.step, [0]

            def profiled(step=step, count=count, prof=prof):
                count[0] += 1
                if 20 <= count[0] < 220:
                    prof.enable()
                    try:
                        step()
                    finally:
                        prof.disable()
                else:
                    step()

            eng.step = profiled
        eng.start()

        async def one(i: int, eng=eng, run=run) -> int:
            n = 0
            async for ev in eng.generate(GenerationRequest(f"r{run}-{i}", ids, params)):
                n += len(ev.token_ids or [])
            return n

        async def go() -> float:
            t = time.perf_counter()
            n = sum(await asyncio.gather(*[one(i) for i in range(args.concurrency)]))
            return n / (time.perf_counter() - t)

        tok_s = asyncio.run(go())
        s, steps = eng.stats, max(1, eng.stats["decode_steps"])
        eng.stop()
        per = {k: 1000 * s[f"time_{k}_s"] / steps for k in ("step", "forward", "sample", "postprocess")}
        print(
            f"run {run + 1}: c={args.concurrency} graphs={args.graphs}: {tok_s:.0f} tok/s, {steps} decode steps; "
            + ", ".join(f"{k} {v:.2f} ms" for k, v in per.items())
            + " a step",
            flush=True,
        )
        if prof is not None:
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
