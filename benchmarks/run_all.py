"""Server vs raw ``model.generate`` on the same model, in the same run, on the same machine.

Prints (and writes to bench-results/throughput-<time>.json):
  * raw generate tokens/s at batch 1 and on a static batch of 32 (min_new_tokens = max_new_tokens,
    so nothing stops early), the prefill time of one prompt and one decode step;
  * the server (`chatserve serve` in a subprocess) under `chatserve bench`'s closed loop at each
    concurrency, streaming, with ignore_eos so every request makes exactly --max-tokens tokens;
  * the ratios the issues ask for (c=1 vs generate b=1, c=32 vs static b=32, TTFT p50 at c=8 vs
    prefill + one decode step) and the server's RSS after the first 50 and after 500 requests.

    make bench                     # defaults: SmolLM2-135M-Instruct, float32, 64 tokens, c=1,8,32
    .venv/bin/python benchmarks/run_all.py --concurrency 1,8,32 --max-tokens 64 --leak-requests 500
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.bench import DEFAULT_PROMPTS, run_load  # noqa: E402


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_server(extra: list[str], model: str | None = None, dtype: str = "float32"):
    """`chatserve serve` in a subprocess on a free port, once /health answers: (process, port)."""
    import httpx
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--dtype", dtype,
           "--device", "cpu", "--log-level", "warning"] + (["--model", model] if model else []) + extra
    print(">> starting", " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=ROOT)
    deadline = time.time() + 600
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit("server did not start")
        time.sleep(0.5)


def measured_run(port: int, model: str, c: int, n: int, max_tokens: int, prompts, warmup: int = 0):
    """`chatserve bench`'s closed loop at concurrency c against the server on ``port``: (its summary,
    how much each engine counter on /health moved during the run)."""
    import httpx
    health = f"http://127.0.0.1:{port}/health"
    before = httpx.get(health).json()["stats"]
    s = asyncio.run(run_load(f"http://127.0.0.1:{port}/v1", model, c, n, max_tokens, prompts, ignore_eos=True,
                             warmup=warmup))
    after = httpx.get(health).json()["stats"]
    return s, {k: v - before.get(k, 0) for k, v in after.items()}


def write_report(prefix: str, report: dict) -> Path:
    out = ROOT / "bench-results" / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(">> wrote", out)
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def raw_generate(model_spec: str | None, dtype: str, max_tokens: int, batch: int, repeats: int) -> dict:
    import torch
    from engine.loader import load_model

    lm = load_model(model_spec, device="cpu", dtype=dtype)
    tok, model = lm.tokenizer, lm.model
    prompts = [tok.apply_chat_template([{"role": "user", "content": DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)]}],
                                       add_generation_prompt=True, tokenize=False) for i in range(batch)]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def run(n: int) -> float:
        enc = tok(prompts[:n], return_tensors="pt", padding=True, add_special_tokens=False)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        dt = time.perf_counter() - t
        assert out.shape[1] - enc["input_ids"].shape[1] == max_tokens
        return n * max_tokens / dt

    run(1)   # warm-up
    b1 = statistics.median(run(1) for _ in range(max(5, repeats)))   # the noisiest figure: more runs
    bN = statistics.median(run(batch) for _ in range(max(1, repeats // 2)))
    # prefill of one prompt + one decode step (the TTFT floor)
    enc = tok(prompts[:1], return_tensors="pt", add_special_tokens=False)
    times = []
    with torch.inference_mode():
        for _ in range(max(7, repeats)):   # a short measurement: more runs against the machine's noise
            t = time.perf_counter()
            model.generate(**enc, max_new_tokens=2, min_new_tokens=2, do_sample=False)
            times.append(time.perf_counter() - t)
    return {"generate_b1_tok_s": b1, f"generate_b{batch}_tok_s": bN,
            "prefill_plus_decode_s": statistics.median(times), "prompt_tokens": enc["input_ids"].shape[1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model spec (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests-per-run", type=int, default=0, help="default: max(4*c, 8)")
    ap.add_argument("--static-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--leak-requests", type=int, default=500, help="0 to skip the RSS check")
    ap.add_argument("--skip-raw", action="store_true")
    ap.add_argument("--server-args", default="", help="extra `chatserve serve` flags")
    args = ap.parse_args()
    conc = [int(c) for c in args.concurrency.split(",")]
    report: dict = {"args": vars(args), "machine": os.uname().nodename, "cpus": os.cpu_count()}

    if not args.skip_raw:
        print(f">> raw model.generate ({args.dtype}, {args.max_tokens} tokens, min_new_tokens={args.max_tokens})")
        report["raw"] = raw_generate(args.model, args.dtype, args.max_tokens, args.static_batch, args.repeats)
        print(json.dumps(report["raw"], indent=2))

    proc, port = start_server(["--max-running", str(max(conc))] + args.server_args.split(), args.model, args.dtype)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        import httpx
        model = httpx.get(base + "/models").json()["data"][0]["id"]
        runs = []
        for c in conc:
            n = args.requests_per_run or max(4 * c, 8)
            s, moved = measured_run(port, model, c, n, args.max_tokens, DEFAULT_PROMPTS, warmup=1 if c == conc[0] else 0)
            s["mean_batch_rows"] = moved.get("decode_rows", 0) / max(1, moved.get("decode_steps", 0))
            runs.append({k: s[k] for k in ("concurrency", "ok", "failed", "output_throughput", "ttft_ms", "tpot_ms",
                                           "itl_ms", "e2e_ms", "total_output_tokens", "mean_batch_rows")})
            print(f"   c={c:>3}: {s['ok']} ok {s['failed']} failed, {s['output_throughput']:.1f} tok/s, "
                  f"TTFT p50 {s['ttft_ms']['p50']:.0f} ms, TPOT p50 {s['tpot_ms']['p50']:.1f} ms, "
                  f"mean rows per decode step {s['mean_batch_rows']:.1f}")
        report["server"] = runs
        if args.leak_requests:
            print(f">> RSS over {args.leak_requests} requests (c=8, 16 tokens each)")
            asyncio.run(run_load(base, model, 8, 50, 16, DEFAULT_PROMPTS, ignore_eos=True))
            rss50 = rss_mb(proc.pid)
            asyncio.run(run_load(base, model, 8, args.leak_requests - 50, 16, DEFAULT_PROMPTS, ignore_eos=True))
            rss500 = rss_mb(proc.pid)
            report["rss_mb"] = {"after_50": rss50, f"after_{args.leak_requests}": rss500, "ratio": rss500 / rss50}
            print(f"   RSS after 50: {rss50:.0f} MB, after {args.leak_requests}: {rss500:.0f} MB "
                  f"({rss500 / rss50:.3f}x)")
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    if "raw" in report:
        raw = report["raw"]
        by_c = {r["concurrency"]: r for r in report["server"]}
        ratios = {}
        if 1 in by_c:
            ratios["c1_vs_generate_b1"] = by_c[1]["output_throughput"] / raw["generate_b1_tok_s"]
        key = f"generate_b{args.static_batch}_tok_s"
        if args.static_batch in by_c:
            ratios[f"c{args.static_batch}_vs_static_b{args.static_batch}"] = (
                by_c[args.static_batch]["output_throughput"] / raw[key])
        if 8 in by_c:
            ratios["ttft_p50_c8_vs_prefill_plus_decode"] = (by_c[8]["ttft_ms"]["p50"] / 1000) / raw["prefill_plus_decode_s"]
        report["ratios"] = ratios
        print(">> ratios:", json.dumps(ratios, indent=2))
    write_report("throughput", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
