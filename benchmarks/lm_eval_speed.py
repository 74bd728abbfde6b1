"""lm-evaluation-harness through the server vs the harness's own `hf` backend, in one run.

The same multiple-choice task (a few hundred local examples, four choices each: sums, capitals,
animal sounds; benchmarks/lm_eval_tasks.py) is scored twice on the same local weights: by
`lm_eval --model local-completions` against a `chatserve serve` started here (prompt logprobs
through /v1/completions, `--batch-size` prompts per request) and by `lm_eval --model hf`
(`--batch-size` sequences per forward). Each run is its own `python -m lm_eval` process; the figures
are examples per second of the harness's own evaluation time (model loading included, the server's
start-up not) and of the process's wall time, with their ratio. The two runs' accuracies and largest
loglikelihood difference are printed too: they should agree.

    .venv/bin/python benchmarks/lm_eval_speed.py                       # 300 examples, batch 16
    .venv/bin/python benchmarks/lm_eval_speed.py --examples 100 --batch-size 32 --repeats 3
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lm_eval_tasks import MC_TASK, harness_command, harness_env, results, run_harness, samples, write_tasks  # noqa: E402
from run_all import start_server, write_report  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model spec as for `chatserve serve --model` (default SmolLM2)")
    ap.add_argument("--examples", type=int, default=300, help="multiple-choice examples (4 choices each)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per request / sequences per hf forward")
    ap.add_argument("--num-concurrent", type=int, default=1, help="local-completions requests in flight")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each backend (medians are reported)")
    ap.add_argument("--server-args", default="", help="extra `chatserve serve` flags")
    args = ap.parse_args()

    from engine.loader import local_folder

    folder = local_folder(args.model)
    work = Path(tempfile.mkdtemp(prefix="chatserve-lm-eval-"))
    tasks = write_tasks(work / "tasks", mc_count=args.examples)
    env = harness_env(work / "hf-datasets-cache")
    proc, port = start_server(shlex.split(args.server_args), args.model)
    try:
        import httpx

        model = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
        backends = {  # name: (--model, --model_args, further flags)
            "local-completions": (
                "local-completions",
                {
                    "base_url": f"http://127.0.0.1:{port}/v1/completions",
                    "model": model,
                    "tokenizer_backend": "huggingface",
                    "tokenizer": folder,
                    "num_concurrent": args.num_concurrent,
                },
                [],
            ),
            "hf": ("hf", {"pretrained": folder, "dtype": "float32"}, ["--device", "cpu"]),
        }
        runs: dict[str, list[dict]] = {name: [] for name in backends}
        for r in range(args.repeats):
            for name, (backend, model_args, flags) in backends.items():  # alternated: drift hits both
                out = work / f"{name}-{r}"
                cmd = harness_command(
                    backend, model_args, [MC_TASK], tasks, out, "--batch_size", str(args.batch_size), *flags
                )
                print(f">> {name} run {r + 1}/{args.repeats}: {shlex.join(cmd)}", flush=True)
                before = httpx.get(f"http://127.0.0.1:{port}/health").json()["stats"]
                wall = run_harness(cmd, env, timeout=3600)
                after = httpx.get(f"http://127.0.0.1:{port}/health").json()["stats"]
                moved = {
                    k: round(after[k] - before.get(k, 0), 3)
                    for k in after
                    if k in ("prefill_tokens", "time_forward_s", "time_step_s", "finished_length", "finished_stop")
                }
                res = results(out)
                run = {
                    "wall_s": wall,
                    "eval_s": float(res["total_evaluation_time_seconds"]),
                    "acc": res["results"][MC_TASK]["acc,none"],
                    "acc_norm": res["results"][MC_TASK]["acc_norm,none"],
                    "loglikelihoods": [[float(x[0][0]) for x in s["resps"]] for s in samples(out, MC_TASK)],
                    "engine": moved,
                }
                runs[name].append(run)
                print(
                    f"   {args.examples / run['eval_s']:.2f} examples/s (harness time {run['eval_s']:.1f} s, "
                    f"wall {wall:.1f} s), acc {run['acc']:.4f}, acc_norm {run['acc_norm']:.4f}",
                    flush=True,
                )
                if moved.get("prefill_tokens"):
                    print(
                        f"   the server's engine: {moved['prefill_tokens']:.0f} prompt tokens, forwards "
                        f"{moved['time_forward_s']:.1f} s, steps {moved['time_step_s']:.1f} s",
                        flush=True,
                    )
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    def median(name, key):
        return statistics.median(run[key] for run in runs[name])

    ours, ref = runs["local-completions"][0], runs["hf"][0]
    worst = max(abs(a - b) for ra, rb in zip(ours["loglikelihoods"], ref["loglikelihoods"]) for a, b in zip(ra, rb))
    summary = {
        name: {
            "examples_per_s": args.examples / median(name, "eval_s"),
            "examples_per_s_wall": args.examples / median(name, "wall_s"),
            "eval_s": median(name, "eval_s"),
            "wall_s": median(name, "wall_s"),
            "acc": runs[name][0]["acc"],
            "acc_norm": runs[name][0]["acc_norm"],
        }
        for name in runs
    }
    ratio = summary["local-completions"]["examples_per_s"] / summary["hf"]["examples_per_s"]
    ratio_wall = summary["local-completions"]["examples_per_s_wall"] / summary["hf"]["examples_per_s_wall"]
    print(f"\n{args.examples} examples x 4 choices, batch {args.batch_size}, {args.repeats} run(s) each (medians):")
    for name, s in summary.items():
        print(
            f"  {name:>17}: {s['examples_per_s']:6.2f} examples/s (harness time {s['eval_s']:.1f} s; "
            f"wall {s['wall_s']:.1f} s: {s['examples_per_s_wall']:.2f}/s); "
            f"acc {s['acc']:.4f} acc_norm {s['acc_norm']:.4f}"
        )
    print(
        f"  local-completions / hf: {ratio:.2f}x (wall {ratio_wall:.2f}x); largest loglikelihood difference {worst:.2e}"
    )
    print("  reproduce: .venv/bin/python benchmarks/lm_eval_speed.py " + shlex.join(sys.argv[1:]))
    for name in runs:
        for run in runs[name]:
            del run["loglikelihoods"]
    write_report(
        "lm-eval-speed",
        {
            "args": vars(args),
            "runs": runs,
            "summary": summary,
            "ratio": ratio,
            "ratio_wall": ratio_wall,
            "max_loglikelihood_diff": worst,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
