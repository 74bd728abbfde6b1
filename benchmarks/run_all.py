"""Server vs raw ``model.generate`` on the same model, in the same run, on the same machine.

Prints (and writes to bench-results/throughput-<time>.json):
  * raw generate tokens/s at batch 1 and on a static batch of 32 (min_new_tokens = max_new_tokens,
    so nothing stops early), the prefill time of one prompt and one decode step;
  * the server (`chatserve serve` in a subprocess) under `chatserve bench`'s closed loop at each
    concurrency, streaming, with ignore_eos so every request makes exactly --max-tokens tokens;
  * the ratios the issues ask for (c=1 vs generate b=1, c=32 vs static b=32, TTFT p50 at c=8 vs
    prefill + one decode step) and the server's RSS after the first 50 and after 500 requests;
  * a peer: `transformers serve --continuous-batching` (transformers' own OpenAI-compatible server on
    its paged cache), started after chatserve is stopped, on the same local model folder, dtype and
    device, driven by the same closed loop at the same concurrencies, and the ratios
    chatserve / transformers-serve of tokens/s, TTFT p50 and TPOT p50. It rejects chatserve's
    ``ignore_eos``/``min_tokens`` fields, so each request carries a ``generation_config`` with
    ``eos_token_id=-1`` instead (its paged path then stops only at max_tokens); the report says how
    many tokens each request actually made. If it cannot start, the run says why and goes on
    without it (``--no-peer`` skips it).

    make bench                     # defaults: SmolLM2-135M-Instruct, float32, 64 tokens, c=1,8,32
    .venv/bin/python benchmarks/run_all.py --concurrency 1,8,32 --max-tokens 64 --leak-requests 500
    .venv/bin/python benchmarks/run_all.py --concurrency 1,32 --leak-requests 0 --skip-raw   # vs the peer only
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
import tempfile
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
    cmd = (
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--port",
            str(port),
            "--dtype",
            dtype,
            "--device",
            "cpu",
            "--log-level",
            "warning",
        ]
        + (["--model", model] if model else [])
        + extra
    )
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
    s = asyncio.run(
        run_load(f"http://127.0.0.1:{port}/v1", model, c, n, max_tokens, prompts, ignore_eos=True, warmup=warmup)
    )
    after = httpx.get(health).json()["stats"]
    return s, {k: v - before.get(k, 0) for k, v in after.items()}


RUN_KEYS = (
    "concurrency",
    "ok",
    "failed",
    "output_throughput",
    "ttft_ms",
    "tpot_ms",
    "itl_ms",
    "e2e_ms",
    "total_output_tokens",
    "mean_output_tokens",
)


def start_peer(model_spec: str | None, dtype: str, extra: list[str], timeout: float = 600):
    """`transformers serve --continuous-batching` in a subprocess on a free port, on the local
    save_pretrained folder chatserve loads (a GGUF is dequantized into it once), offline.

    Returns (process, port, model folder, command, log path) once /health answers 200, or raises
    RuntimeError saying why (the tail of its log) after stopping it."""
    import httpx

    from engine.loader import local_folder

    folder = str(local_folder(model_spec))
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "transformers.cli.transformers",
        "serve",
        folder,
        "--continuous-batching",
        "--device",
        "cpu",
        "--dtype",
        dtype,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ] + extra
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log = tempfile.NamedTemporaryFile("wb", prefix="transformers-serve-", suffix=".log", delete=False)
    print(">> starting", " ".join(cmd), f"(log: {log.name})")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, port, folder, cmd, log.name
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            why = f"exited with {proc.returncode}" if proc.poll() is not None else f"no /health 200 in {timeout:.0f} s"
            stop(proc)
            lines = Path(log.name).read_text(errors="replace").strip().splitlines()
            # the lines that name an error (a CLI usage error comes before its help text), else the tail
            tail = [ln for ln in lines if "error" in ln.lower()][-8:] or lines[-15:]
            raise RuntimeError(why + (f"; from {log.name}:\n    " + "\n    ".join(tail) if tail else ""))
        time.sleep(0.5)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def peer_generation_config(folder: str, max_tokens: int) -> str:
    """The ``generation_config`` field (a JSON string) for transformers serve: the model's own generation
    config with EOS disabled (its paged path then stops only at max_new_tokens), greedy."""
    path = Path(folder) / "generation_config.json"
    cfg = json.loads(path.read_text()) if path.exists() else {}
    for k in ("_from_model_config", "transformers_version"):
        cfg.pop(k, None)
    cfg.update(eos_token_id=-1, do_sample=False, max_new_tokens=max_tokens)
    return json.dumps(cfg)


def run_peer(args, conc: list[int]) -> dict:
    """The peer at each concurrency in ``conc``: {"name", "command", "model", "runs": [...]} or {"error"}."""
    import httpx

    out: dict = {"name": "transformers-serve", "continuous_batching": True}
    try:
        proc, port, folder, cmd, log = start_peer(args.model, args.dtype, args.peer_args.split())
    except Exception as e:  # a peer that cannot start must not stop the rest of the run
        print(f">> transformers serve did not start, going on without it: {type(e).__name__}: {e}")
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    import transformers

    out.update(command=" ".join(cmd), model=folder, log=log, transformers_version=transformers.__version__)
    base = f"http://127.0.0.1:{port}/v1"
    runs = []
    try:
        model = httpx.get(base + "/models", timeout=30).json()["data"][0]["id"]
        extra = {"generation_config": peer_generation_config(folder, args.max_tokens)}
        for c in conc:
            n = args.requests_per_run or max(4 * c, 8)
            # the first request builds the paged cache and its worker: a warm-up before the first run
            s = asyncio.run(
                run_load(
                    base,
                    model,
                    c,
                    n,
                    args.max_tokens,
                    DEFAULT_PROMPTS,
                    ignore_eos=False,
                    extra_body=extra,
                    warmup=1 if c == conc[0] else 0,
                )
            )
            runs.append({k: s[k] for k in RUN_KEYS})
            runs[-1]["errors"] = s["errors"]
            runs[-1]["exact_max_tokens"] = all(
                r["completion_tokens"] == args.max_tokens for r in s["requests"] if r["ok"]
            )
            print(
                f"   c={c:>3}: {s['ok']} ok {s['failed']} failed, {s['output_throughput']:.1f} tok/s, "
                f"TTFT p50 {fmt(s['ttft_ms']['p50'], '.0f')} ms, TPOT p50 {fmt(s['tpot_ms']['p50'], '.1f')} ms, "
                f"mean output tokens {fmt(s['mean_output_tokens'], '.1f')}"
            )
            if s["errors"]:
                print("      errors:", s["errors"][:3])
            if not runs[-1]["exact_max_tokens"]:
                print(
                    f"      note: not every request made exactly {args.max_tokens} tokens; "
                    "tokens/s counts the tokens actually received"
                )
    except Exception as e:
        print(f">> transformers serve run failed, going on without the rest of it: {type(e).__name__}: {e}")
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        stop(proc)
    out["runs"] = runs
    return out


def fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def peer_ratios(server_runs: list[dict], peer_runs: list[dict]) -> dict:
    """chatserve / transformers-serve at each concurrency both ran: tokens/s (> 1: chatserve faster),
    TTFT p50 and TPOT p50 (< 1: chatserve faster)."""

    def div(a, b):
        return a / b if a is not None and b else None

    ours = {r["concurrency"]: r for r in server_runs}
    out = {}
    for p in peer_runs:
        c, r = p["concurrency"], ours.get(p["concurrency"])
        if r is None or not p["ok"] or not r["ok"]:
            continue
        out[f"c{c}"] = {
            "tok_s": div(r["output_throughput"], p["output_throughput"]),
            "ttft_p50": div(r["ttft_ms"]["p50"], p["ttft_ms"]["p50"]),
            "tpot_p50": div(r["tpot_ms"]["p50"], p["tpot_ms"]["p50"]),
        }
    return out


def print_peer_summary(server_runs: list[dict], peer: dict) -> None:
    ours = {r["concurrency"]: r for r in server_runs}
    print(">> chatserve vs transformers serve --continuous-batching (same model folder, dtype, device, loop)")
    print(f"   {'c':>3}  {'':<19} {'tok/s':>8} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12} {'tokens/req':>11}")
    for p in peer.get("runs", []):
        c = p["concurrency"]
        rows = [("chatserve", ours.get(c)), ("transformers-serve", p)]
        for name, r in rows:
            if r is None:
                continue
            print(
                f"   {c:>3}  {name:<19} {r['output_throughput']:>8.1f} {fmt(r['ttft_ms']['p50'], '.0f'):>12} "
                f"{fmt(r['tpot_ms']['p50'], '.1f'):>12} {fmt(r['mean_output_tokens'], '.1f'):>11}"
            )
        q = peer.get("ratios", {}).get(f"c{c}")
        if q:
            print(
                f"   {c:>3}  {'chatserve / peer':<19} {fmt(q['tok_s'], '.2f') + 'x':>8} "
                f"{fmt(q['ttft_p50'], '.2f') + 'x':>12} {fmt(q['tpot_p50'], '.2f') + 'x':>12}"
            )


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
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for i in range(batch)
    ]
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

    run(1)  # warm-up
    b1 = statistics.median(run(1) for _ in range(max(5, repeats)))  # the noisiest figure: more runs
    bN = statistics.median(run(batch) for _ in range(max(1, repeats // 2)))
    # prefill of one prompt + one decode step (the TTFT floor)
    enc = tok(prompts[:1], return_tensors="pt", add_special_tokens=False)
    times = []
    with torch.inference_mode():
        for _ in range(max(7, repeats)):  # a short measurement: more runs against the machine's noise
            t = time.perf_counter()
            model.generate(**enc, max_new_tokens=2, min_new_tokens=2, do_sample=False)
            times.append(time.perf_counter() - t)
    return {
        "generate_b1_tok_s": b1,
        f"generate_b{batch}_tok_s": bN,
        "prefill_plus_decode_s": statistics.median(times),
        "prompt_tokens": enc["input_ids"].shape[1],
    }


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
    ap.add_argument(
        "--peer",
        choices=["transformers-serve", "none"],
        default="transformers-serve",
        help="also measure `transformers serve --continuous-batching` (default; skipped with a "
        "message if it cannot start)",
    )
    ap.add_argument("--no-peer", dest="peer", action="store_const", const="none", help="same as --peer none")
    ap.add_argument("--peer-concurrency", default="", help="the peer's concurrencies (default: --concurrency)")
    ap.add_argument("--peer-args", default="", help="extra `transformers serve` flags (e.g. --cb-num-blocks 256)")
    args = ap.parse_args()
    conc = [int(c) for c in args.concurrency.split(",")]
    peer_conc = [int(c) for c in args.peer_concurrency.split(",")] if args.peer_concurrency else conc
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
            s, moved = measured_run(
                port, model, c, n, args.max_tokens, DEFAULT_PROMPTS, warmup=1 if c == conc[0] else 0
            )
            s["mean_batch_rows"] = moved.get("decode_rows", 0) / max(1, moved.get("decode_steps", 0))
            runs.append({k: s[k] for k in RUN_KEYS + ("mean_batch_rows",)})
            print(
                f"   c={c:>3}: {s['ok']} ok {s['failed']} failed, {s['output_throughput']:.1f} tok/s, "
                f"TTFT p50 {s['ttft_ms']['p50']:.0f} ms, TPOT p50 {s['tpot_ms']['p50']:.1f} ms, "
                f"mean rows per decode step {s['mean_batch_rows']:.1f}"
            )
        report["server"] = runs
        if args.leak_requests:
            print(f">> RSS over {args.leak_requests} requests (c=8, 16 tokens each)")
            asyncio.run(run_load(base, model, 8, 50, 16, DEFAULT_PROMPTS, ignore_eos=True))
            rss50 = rss_mb(proc.pid)
            asyncio.run(run_load(base, model, 8, args.leak_requests - 50, 16, DEFAULT_PROMPTS, ignore_eos=True))
            rss500 = rss_mb(proc.pid)
            report["rss_mb"] = {"after_50": rss50, f"after_{args.leak_requests}": rss500, "ratio": rss500 / rss50}
            print(
                f"   RSS after 50: {rss50:.0f} MB, after {args.leak_requests}: {rss500:.0f} MB ({rss500 / rss50:.3f}x)"
            )
    finally:
        stop(proc)

    if args.peer == "transformers-serve":
        # after chatserve is stopped: the two never share the CPU
        print(
            f">> transformers serve --continuous-batching ({args.dtype}, cpu, {args.max_tokens} tokens, "
            "generation_config eos_token_id=-1)"
        )
        peer = run_peer(args, peer_conc)
        if peer.get("runs"):
            peer["ratios"] = peer_ratios(report["server"], peer["runs"])
        report["peer"] = peer

    if "raw" in report:
        raw = report["raw"]
        by_c = {r["concurrency"]: r for r in report["server"]}
        ratios = {}
        if 1 in by_c:
            ratios["c1_vs_generate_b1"] = by_c[1]["output_throughput"] / raw["generate_b1_tok_s"]
        key = f"generate_b{args.static_batch}_tok_s"
        if args.static_batch in by_c:
            ratios[f"c{args.static_batch}_vs_static_b{args.static_batch}"] = (
                by_c[args.static_batch]["output_throughput"] / raw[key]
            )
        if 8 in by_c:
            ratios["ttft_p50_c8_vs_prefill_plus_decode"] = (by_c[8]["ttft_ms"]["p50"] / 1000) / raw[
                "prefill_plus_decode_s"
            ]
        report["ratios"] = ratios
        print(">> ratios:", json.dumps(ratios, indent=2))
    if report.get("peer", {}).get("runs"):
        print_peer_summary(report["server"], report["peer"])
    elif "peer" in report:
        print(">> no transformers serve figures:", report["peer"].get("error", "no runs"))
    write_report("throughput", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
