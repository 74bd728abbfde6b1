"""chatserve on a vision-language model: image requests next to text-only requests of the same
prompt length, on one model, in process and over HTTP (issue #9).

No weights reach the GPU machines, so the model is LLaVA-1.5-7B's shape with random weights, built
on the device in bf16: a CLIP ViT-L/14 vision tower at 336 px (24 layers, hidden 1024, 16 heads,
576 image tokens per image), the two-layer projector, and Llama-2-7B (32 layers, hidden 4096, 32
heads, intermediate 11008, vocabulary 32064). The tokenizer is word-level (benchmarks/gpu_engine.py)
with an ``<image>`` token, and the processor is a real LlavaProcessor (CLIP image processor), so a
request's image is decoded, resized to 336 px, normalized and expanded to 576 tokens as in
production.

Each image request holds one generated 640x480 JPEG (a different one per request) and a few words;
each text request holds words only, as many tokens as the image request's whole prompt. Every
request makes exactly --max-tokens tokens (ignore_eos), prefix cache off. One JSON line per figure,
a table at the end:

* engine: the engine in process, closed loop at c = 1 and 16; the image prompts are prepared (the
  processor's work) before the clock starts, so TTFT is the vision encoder plus prefill.
* http: the whole server in this process, the data: URL images sent by server.bench's run_load
  from a subprocess; TTFT includes decoding the image and the processor.
* vision: the encoder's time per image, from the engine's counters.

    python benchmarks/gpu_vlm.py [--output FILE.json]       # CUDA, LLaVA-1.5-7B shape
    python benchmarks/gpu_vlm.py --tiny                     # the same code on CPU, a tiny LLaVA
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_engine import LINES, ROOT, closed_loop, emit, http_load, word_tokenizer  # noqa: E402

sys.path.insert(0, str(ROOT))

SHAPES = {
    "llava-1.5-7b": dict(
        vision=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
            hidden_act="quick_gelu",
        ),
        text=dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
        vocab_size=32064,
        vision_feature_layer=-2,
    ),
    "tiny": dict(
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
            projection_dim=32,
        ),
        text=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
        ),
        vocab_size=5000,
        vision_feature_layer=-1,
    ),
}
# gpu_engine's template, with an image part written as the processor's placeholder.
TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'text' %}{{ p['text'] }}{% elif p['type'] == 'image' %}{{ ' <image> ' }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' <|im_end|> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}"
)


def build(shape: str, device: str, dtype, folder: Path):
    """A random-weight LLaVA of the shape, its word-level tokenizer (+ ``<image>``) and a real
    LlavaProcessor; returns (LoadedModel, image tokens per image, build seconds)."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from engine.loader import LoadedModel

    spec = SHAPES[shape]
    V = spec["vocab_size"]
    tok = word_tokenizer(V - 1, folder)  # ids 0 .. V-2, then <image> = V-1: the vocabulary is V
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id == V - 1 and len(tok) == V, (image_id, len(tok))
    side = spec["vision"]["image_size"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tok,
        patch_size=spec["vision"]["patch_size"],
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=TEMPLATE,
    )
    config = LlavaConfig(
        text_config=LlamaConfig(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0, **spec["text"]),
        vision_config=CLIPVisionConfig(**spec["vision"]),
        image_token_index=image_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=spec["vision_feature_layer"],
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval()
    build_s = time.perf_counter() - t0
    lm = LoadedModel(
        model=model,
        tokenizer=tok,
        name=shape,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        max_model_len=2048,
        source=shape,
        load_seconds=build_s,
        processor=processor,
    )
    return lm, (side // spec["vision"]["patch_size"]) ** 2, build_s


def photo(i: int, size=(640, 480)) -> bytes:
    """A generated 640x480 JPEG, different for every i: a colour gradient, shapes and noise."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(i)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = (x / w * 0.6 + y / h * 0.4)[..., None]
    arr = c0 * (1 - t) + c1 * t + rng.normal(0, 12, (h, w, 3))
    img = Image.fromarray(arr.clip(0, 255).astype("uint8"))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - 80)), int(rng.integers(0, h - 80))
        box = [x0, y0, x0 + int(rng.integers(40, 200)), y0 + int(rng.integers(40, 200))]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def data_url(jpeg: bytes) -> str:
    import base64

    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def table() -> str:
    """The engine and http lines as one table: image vs text at each c, and their ratio."""
    rows = sorted(
        (x for x in LINES if x.get("what") in ("engine", "http")), key=lambda r: (r["what"], r["c"], r["input"])
    )
    out = [
        f"{'path':<7}{'c':>4}  {'input':<6}{'prompt':>7}{'tok/s':>10}{'TTFT p50 ms':>13}{'TTFT p90 ms':>13}",
    ]
    for r in rows:
        out.append(
            f"{r['what']:<7}{r['c']:>4}  {r['input']:<6}{r.get('prompt_tokens') or 0:>7.0f}{r['tok_s']:>10.1f}"
            f"{r['ttft_p50_ms']:>13.1f}{r['ttft_p90_ms']:>13.1f}"
        )
    for path in ("engine", "http"):
        for c in sorted({r["c"] for r in rows if r["what"] == path}):
            pair = {r["input"]: r for r in rows if r["what"] == path and r["c"] == c}
            if {"image", "text"} <= pair.keys():
                i, t = pair["image"], pair["text"]
                out.append(
                    f"{path} c={c}: image/text tok/s {i['tok_s'] / t['tok_s']:.2f}, "
                    f"TTFT p50 {i['ttft_p50_ms'] / t['ttft_p50_ms']:.2f}x"
                )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny LLaVA on CPU, fewer requests: tests the code path")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 64; 8 with --tiny)")
    ap.add_argument("--text-words", type=int, default=32, help="words beside the image in an image request")
    ap.add_argument("--levels", default="1,16", help="concurrency levels")
    ap.add_argument("--requests", default=None, help="requests per level (default 8,48; 2,16 with --tiny)")
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument("--output", default=None, help="also write every line to this JSON file")
    ap.add_argument("--switch-interval", type=float, default=0.005, help="sys.setswitchinterval (see gpu_engine.py)")
    args = ap.parse_args()
    sys.setswitchinterval(args.switch_interval)

    import torch
    import transformers
    from PIL import Image

    from engine.engine import Engine, EngineConfig
    from engine.request import SamplingParams

    shape = "tiny" if args.tiny else "llava-1.5-7b"
    dev = args.device or ("cpu" if args.tiny else "cuda")
    cuda = dev.startswith("cuda")
    T = args.max_tokens or (8 if args.tiny else 64)
    levels = [int(c) for c in args.levels.split(",")]
    counts = [int(n) for n in (args.requests or ("2,16" if args.tiny else "8,48")).split(",")]
    if len(counts) != len(levels):
        ap.error("--requests needs one count per level")
    emit(
        what="env",
        torch=torch.__version__,
        transformers=transformers.__version__,
        gpu=torch.cuda.get_device_name(0) if cuda else "cpu",
    )
    lm, per_image, build_s = build(shape, dev, torch.bfloat16 if cuda else torch.float32, Path(tempfile.mkdtemp()))
    model = lm.model
    vision = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n)
    emit(
        what="model",
        shape=shape,
        params_b=sum(p.numel() for p in model.parameters()) / 1e9,
        vision_params_b=vision / 1e9,
        weight_gb=sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9,
        image_tokens=per_image,
        build_s=build_s,
    )

    t = time.perf_counter()
    eng = Engine(lm, EngineConfig(max_running=max(levels), prefix_cache=False)).start()
    emit(
        what="engine_start",
        shape=shape,
        s=time.perf_counter() - t,
        graphs=sorted(eng.graphs.graphs) if getattr(eng, "graphs", None) is not None else None,
    )
    try:
        assert eng.accepts_images, "the engine serves this model text-only"
        n_images = max(counts)
        jpegs = [photo(i) for i in range(n_images)]
        V = SHAPES[shape]["vocab_size"]
        g = torch.Generator().manual_seed(1)

        def words(k: int) -> str:
            return " ".join(f"w{t}" for t in torch.randint(3, V - 1, (k,), generator=g).tolist())

        def image_msg(url: str) -> list[dict]:
            parts = [{"type": "text", "text": words(args.text_words)}, {"type": "image_url", "image_url": {"url": url}}]
            return [{"role": "user", "content": parts}]

        image_msgs = [image_msg(data_url(j)) for j in jpegs]
        t = time.perf_counter()
        prepared = [
            eng.prepare_prompt(m, [Image.open(io.BytesIO(j)).convert("RGB")]) for m, j in zip(image_msgs, jpegs)
        ]
        emit(what="processor", shape=shape, ms_per_image=(time.perf_counter() - t) / n_images * 1000)
        image_ids, image_mm = [p[0] for p in prepared], [p[1] for p in prepared]
        target = len(image_ids[0])
        assert sum(1 for x in image_ids[0] if x == eng.image_token_id) == per_image
        # a text prompt of k words is base + k tokens (one token a word)
        base = len(eng.render_prompt([{"role": "user", "content": words(1)}])) - 1
        text_msgs = [[{"role": "user", "content": words(target - base)}] for _ in range(n_images)]
        text_ids = [eng.render_prompt(m) for m in text_msgs]
        assert len(text_ids[0]) == target, (len(text_ids[0]), target)

        params = SamplingParams(temperature=0, max_tokens=T, ignore_eos=True)
        inputs = {"image": (image_ids, image_mm), "text": (text_ids, None)}
        for ids, mm in inputs.values():
            closed_loop(eng, ids, params, min(4, max(levels)), min(8, n_images), multimodal=mm)  # warm-up
        for c, n in zip(levels, counts):
            for kind, (ids, mm) in inputs.items():
                before = (eng.stats["images_encoded"], eng.stats["time_vision_s"])
                r = closed_loop(eng, ids, params, c, n, multimodal=mm)
                emit(
                    what="engine",
                    shape=shape,
                    input=kind,
                    c=c,
                    requests=n,
                    prompt_tokens=len(ids[0]),
                    tok_s=r["tok_s"],
                    ttft_p50_ms=r["ttft_p50_ms"],
                    ttft_p90_ms=r["ttft_p90_ms"],
                )
                if mm:
                    k = eng.stats["images_encoded"] - before[0]
                    emit(
                        what="vision",
                        shape=shape,
                        c=c,
                        images=k,
                        ms_per_image=(eng.stats["time_vision_s"] - before[1]) / max(k, 1) * 1000,
                    )
        if not args.no_http:
            for kind, msgs in (("image", image_msgs), ("text", text_msgs)):
                http_load(eng, shape, msgs, list(zip(levels, counts)), T, input=kind)
        emit(
            what="engine_stats",
            shape=shape,
            **{k: v for k, v in eng.stats.items() if k.startswith(("time_", "graph", "decode", "images"))},
        )
    finally:
        eng.stop()
    print(table(), flush=True)
    if args.output:
        import json

        Path(args.output).write_text(json.dumps(LINES, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
