"""Model loading by Hugging Face Hub id from the standard cache (no Hub access here: the cache is
laid out by the test, as huggingface_hub writes it)."""

from __future__ import annotations

import shutil

import pytest

from engine.loader import ModelLoadError, load_model, resolve_model

REV = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo_id: str, source) -> None:
    """models--ORG--NAME/{refs/main, snapshots/<rev>/...}: what `huggingface-cli download` leaves."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / REV
    shutil.copytree(source, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "hub").mkdir()
    return tmp_path / "hub"


def test_a_hub_id_loads_from_the_cache_offline(offline_cache, tiny_model_dir):
    hub_cache(offline_cache, "tiny-org/tiny-llama", tiny_model_dir)
    loaded = load_model("tiny-org/tiny-llama", device="cpu", dtype="float32")
    assert loaded.name == "tiny-org/tiny-llama"  # served under its Hub id
    assert loaded.model.config.num_hidden_layers == 2
    folder, gguf = resolve_model("tiny-org/tiny-llama", revision=REV)
    assert folder.name == REV and gguf is None


def test_a_missing_hub_model_is_one_clear_error(offline_cache):
    with pytest.raises(ModelLoadError) as err:
        load_model("nobody/not-here", device="cpu")
    msg = str(err.value)
    assert "nobody/not-here" in msg and "HF_HUB_OFFLINE=1" in msg and str(offline_cache) in msg
    assert "huggingface-cli download nobody/not-here" in msg and "\n" not in msg


def test_specs_that_are_neither_are_refused():
    with pytest.raises(ModelLoadError, match="Hub id"):
        resolve_model("/no/such/folder")
    with pytest.raises(ModelLoadError, match="Hub id"):
        resolve_model("not a model id")


def test_the_cli_prints_one_line_and_exits_1_when_the_model_is_missing(offline_cache, capsys):
    from server.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--model", "nobody/not-here", "--device", "cpu"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chatserve: model nobody/not-here is not in the Hugging Face cache")


def test_a_torchvision_built_for_another_torch_is_one_clear_error_not_a_traceback(tmp_path, tiny_model_dir):
    """transformers imports torchvision whenever it is installed, so one that does not load with this
    torch (here a stand-in failing as such a build does) stopped even text models, with "Could not
    import module 'AttentionInterface'". The server now names the package and exits 1 with one line.
    A fresh interpreter: the stand-in must be what `import torchvision` finds."""
    import subprocess
    import sys
    from pathlib import Path

    fake = tmp_path / "site"
    (fake / "torchvision").mkdir(parents=True)
    failure = 'raise RuntimeError("operator torchvision::nms does not exist")\n'
    (fake / "torchvision" / "__init__.py").write_text(failure)
    dist = fake / "torchvision-9.9.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 9.9.0\n")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", "from server.cli import main; main()"]
        + ["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--port", "1"],
        cwd=root,
        env={**__import__("os").environ, "PYTHONPATH": f"{fake}:{root}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("chatserve: torchvision 9.9.0 is installed but does not load with torch "), err[-1]
    assert "RuntimeError: operator torchvision::nms does not exist" in err[-1]
    assert "Traceback" not in proc.stderr
