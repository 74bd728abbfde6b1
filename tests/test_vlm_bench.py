"""benchmarks/gpu_vlm.py --tiny: the GPU VLM benchmark's code path (random-weight LLaVA, a real
processor, data: URL images over HTTP, text requests of the same prompt length) runs on CPU and
reports every figure it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_vlm_tiny_reports_image_and_text_figures_at_each_concurrency(tmp_path):
    out = tmp_path / "vlm.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_vlm.py", "--tiny", "--output", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert json.loads(out.read_text()) == printed
    assert not [x for x in printed if x["what"].endswith("_error")]
    model = next(x for x in printed if x["what"] == "model")
    assert model["image_tokens"] == 16  # 56 px at 14 px patches
    figures = {(x["what"], x["input"], x["c"]): x for x in printed if x["what"] in ("engine", "http")}
    assert sorted(figures) == sorted((w, i, c) for w in ("engine", "http") for i in ("image", "text") for c in (1, 16))
    for (what, _, c), x in figures.items():
        assert x["requests"] == {1: 2, 16: 16}[c]
        assert x["tok_s"] > 0 and 0 < x["ttft_p50_ms"] <= x["ttft_p90_ms"]
        if what == "http":
            assert x["ok"] == x["requests"]
    for what in ("engine", "http"):
        for c in (1, 16):
            image, text = figures[(what, "image", c)], figures[(what, "text", c)]
            # text requests match the image request's whole prompt: its 16 image tokens and 32 words
            assert image["prompt_tokens"] == text["prompt_tokens"] > 16 + 32
    vision = {x["c"]: x["images"] for x in printed if x["what"] == "vision"}
    assert vision == {1: 2, 16: 16}  # one encoder pass per image request, none for text
    assert "engine c=16: image/text tok/s" in proc.stdout and "http c=1: image/text" in proc.stdout
