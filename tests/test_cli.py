"""`chatserve serve` settings: defaults <- --config YAML <- command-line flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from server.cli import _serve_parser, resolve_serve_args, resolve_serve_settings
from server.settings import ConfigError


def args(argv):
    p = argparse.ArgumentParser()
    _serve_parser(p)
    return p.parse_args(argv)


def settings(argv):
    return resolve_serve_args(args(argv))


def test_defaults_turn_packed_steps_and_the_prefix_cache_on():
    s = settings([])
    assert s["packed"] is True and s["prefix_cache"] is True and s["enforce_eager"] is False
    # the engine picks these by device (tests/test_engine.py: 1 and 512 on CPU)
    assert s["max_newcomers"] is None and s["prefill_chunk"] is None
    assert settings(["--enforce-eager"])["enforce_eager"] is True
    assert s["compile"] is False and settings(["--compile"])["compile"] is True
    assert s["kv_cache_gb"] is None and s["block_size"] == 16


def test_flags_override_the_config_file(tmp_path):
    cfg = tmp_path / "preset.yaml"
    cfg.write_text("kv-cache-gb: 0.5\nmax_running: 8\npacked: true\n")
    s = settings(["--config", str(cfg), "--max-running", "4", "--no-packed"])
    assert s["kv_cache_gb"] == 0.5  # from the file
    assert s["max_running"] == 4  # the flag wins
    assert s["packed"] is False
    assert settings(["--no-prefix-cache"])["prefix_cache"] is False


def test_unknown_config_keys_are_refused(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("prefix_cache_gb: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown key 'prefix_cache_gb'"):
        settings(["--config", str(cfg)])


def test_device_map_from_a_flag_or_a_file(tmp_path):
    assert settings([])["device_map"] is None  # loading unchanged: the whole model on --device
    assert settings(["--device-map", "balanced"])["device_map"] == "balanced"
    cfg = tmp_path / "spread.yaml"
    cfg.write_text("device_map:\n  model.embed_tokens: 0\n  model.layers: cuda:1\n  lm_head: cpu\n")
    assert settings(["--config", str(cfg)])["device_map"] == {
        "model.embed_tokens": 0,
        "model.layers": "cuda:1",
        "lm_head": "cpu",
    }
    assert settings(["--config", str(cfg), "--device-map", "auto"])["device_map"] == "auto"  # the flag wins
    with pytest.raises(SystemExit):  # argparse: one of auto, balanced, sequential
        args(["--device-map", "everywhere"])


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_preset_in_configs_is_a_valid_settings_file(preset):
    s = resolve_serve_settings(args(["--config", str(CONFIGS / preset)]))
    for m in s.models:
        assert m["model"] and m["dtype"] in ("auto", "float32", "bfloat16", "float16")
