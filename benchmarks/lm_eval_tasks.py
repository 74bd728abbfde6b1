"""lm-evaluation-harness on local data: task files written here, the harness run as its own CLI.

Used by tests/test_lm_eval.py (the harness through /v1/completions and /v1/chat/completions gives
what its `hf` backend gives on the same weights) and benchmarks/lm_eval_speed.py (examples/s of
both). Nothing is downloaded: each task is a YAML whose dataset is a local JSONL file, loaded with
the `json` builder that ships with `datasets`, and the harness runs with the hubs offline.
"""

from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

MC_TASK = "chatserve_mc"
GEN_TASK = "chatserve_gen"

_CAPITALS = [
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Norway", "Oslo"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Greece", "Athens"),
    ("Poland", "Warsaw"),
]
_ANIMALS = [
    ("dog", "barks"),
    ("cat", "meows"),
    ("cow", "moos"),
    ("duck", "quacks"),
    ("lion", "roars"),
    ("sheep", "bleats"),
    ("horse", "neighs"),
    ("snake", "hisses"),
]


def mc_examples(n: int, seed: int = 0) -> list[dict]:
    """n multiple-choice questions, four choices each, the right one at a random place: sums,
    capitals and animal sounds in turn. Each question is numbered, so no two share a context (as in
    real tasks; the hf backend would otherwise score repeated contexts once)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            a, b = rng.randint(2, 60), rng.randint(2, 40)
            good, wrong = str(a + b), [str(a + b + d) for d in rng.sample([-10, -2, -1, 1, 2, 10], 3)]
            question = f"Question: What is {a} plus {b}?\nAnswer:"
        elif kind == 1:
            country, city = _CAPITALS[rng.randrange(len(_CAPITALS))]
            good = city
            wrong = rng.sample([c for _, c in _CAPITALS if c != city], 3)
            question = f"Question: What is the capital of {country}?\nAnswer:"
        else:
            animal, sound = _ANIMALS[rng.randrange(len(_ANIMALS))]
            good = f"The {animal} {sound}."
            wrong = [f"The {animal} {s}." for s in rng.sample([s for _, s in _ANIMALS if s != sound], 3)]
            question = "Which sentence is true?\nAnswer:"
        answer = rng.randrange(4)
        choices = wrong[:answer] + [good] + wrong[answer:]
        out.append({"question": f"Quiz question {i + 1}.\n{question}", "choices": choices, "answer": answer})
    return out


GEN_EXAMPLES = [
    {
        "question": f"The capital of Spain is Madrid. The capital of Germany is Berlin. The capital of {c} is",
        "answer": city,
    }
    for c, city in (("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Egypt", "Cairo"))
]
GEN_UNTIL = [".", "\n"]
GEN_MAX_TOKENS = 16


def _write_task(folder: Path, task: str, rows: list[dict], spec: str) -> None:
    data = folder / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{task}.yaml").write_text(
        f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n{spec}metadata:\n  version: 1\n"
    )


def write_tasks(folder: Path, mc_count: int = 12, seed: int = 0) -> Path:
    """The two tasks in ``folder`` (pass it as --include_path): MC_TASK, loglikelihood of each of
    four choices (acc, acc_norm); GEN_TASK, greedy generation up to a full stop or a newline."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_task(
        folder,
        MC_TASK,
        mc_examples(mc_count, seed),
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\nmetric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n",
    )
    _write_task(
        folder,
        GEN_TASK,
        GEN_EXAMPLES,
        'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: " {{answer}}"\n'
        f"generation_kwargs:\n  until: {json.dumps(GEN_UNTIL)}\n  max_gen_toks: {GEN_MAX_TOKENS}\n"
        "  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
    )
    return folder


def harness_env(cache: Path) -> dict:
    """The environment for a harness run: hubs offline (nothing may be downloaded), its datasets
    cache in ``cache``."""
    env = dict(os.environ)
    env.update(
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HF_DATASETS_CACHE=str(cache),
        OPENAI_API_KEY=env.get("OPENAI_API_KEY", "unused"),
    )
    return env


def harness_command(
    model: str, model_args: dict, tasks: list[str], include: Path, output: Path, *extra: str
) -> list[str]:
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    return [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        model,
        "--model_args",
        args,
        "--tasks",
        ",".join(tasks),
        "--include_path",
        str(include),
        "--log_samples",
        "--output_path",
        str(output),
        *extra,
    ]


def run_harness(cmd: list[str], env: dict, timeout: float = 600) -> float:
    """Run the harness CLI; its wall time in seconds. Raises with its output's tail if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(
            f"lm_eval failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return took


def results(output: Path) -> dict:
    """The run's results JSON (`results`: {task: {"acc,none": ...}}), from --output_path."""
    [path] = glob.glob(str(output / "**" / "results_*.json"), recursive=True)
    return json.loads(Path(path).read_text())


def samples(output: Path, task: str) -> list[dict]:
    """The run's logged samples of one task, by doc_id."""
    [path] = glob.glob(str(output / "**" / f"samples_{task}_*.jsonl"), recursive=True)
    return sorted((json.loads(line) for line in Path(path).read_text().splitlines()), key=lambda s: s["doc_id"])
