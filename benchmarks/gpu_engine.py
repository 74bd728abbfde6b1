"""The engine against raw ``model.generate`` on a CUDA device, in one process, in one run.

No model weights can reach the GPU machines here, so the models are random-weight Llamas of real
shapes (SmolLM2-135M's, and a ~1B one) with the test tokenizer; throughput does not depend on
the weights when every request makes exactly --max-tokens tokens (ignore_eos / min_new_tokens).
Prompts are random token ids of --prompt-len tokens. Reports tokens/s of generate at batch 1 and
on a static batch of 32, and of the engine (in process, no HTTP) at c=1 and c=32 in a closed
loop, with packed steps and without, plus the ratios.

    python benchmarks/gpu_engine.py [--models smollm2,1b] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
}


def build(shape: str, folder: Path, dtype) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import CHAT_TEMPLATE, build_tokenizer
    tok = build_tokenizer(folder, CHAT_TEMPLATE)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=False,
                      bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), **SHAPES[shape])
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(folder)
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,1b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=56)
    ap.add_argument("--requests", type=int, default=96, help="requests in the c=32 run")
    ap.add_argument("--output", default=None)
    ap.add_argument("--device", default="cuda", help="cpu only to try the script out")
    args = ap.parse_args()

    import torch

    from engine.engine import Engine, EngineConfig
    from engine.loader import load_model
    from engine.request import GenerationRequest, SamplingParams

    dtype = getattr(torch, args.dtype)
    dev = args.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    report = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "args": vars(args), "models": {}}
    print("device:", report["device"], flush=True)
    T = args.max_tokens
    for shape in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            lm = load_model(str(build(shape, Path(tmp), dtype)), device=dev, dtype=args.dtype)
        model = lm.model
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(5, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(32)]
        res: dict = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6}

        def generate(n: int) -> float:
            ids = torch.tensor(prompts[:n], device=dev)
            sync()
            t = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=T, min_new_tokens=T,
                                     do_sample=False, pad_token_id=0)
            sync()
            assert out.shape[1] == args.prompt_len + T
            return n * T / (time.perf_counter() - t)

        generate(1)
        res["generate_b1"] = statistics.median(generate(1) for _ in range(3))
        generate(32)
        res["generate_b32"] = statistics.median(generate(32) for _ in range(3))

        for packed in (True, False):
            eng = Engine(lm, EngineConfig(packed=packed, max_running=32, prefix_cache=False)).start()
            assert eng.packed == packed, "packed self-test failed on this model"
            params = SamplingParams(temperature=0, max_tokens=T, ignore_eos=True)

            async def closed_loop(c: int, n: int) -> float:
                todo = list(range(n))

                async def worker():
                    while todo:
                        i = todo.pop()
                        async for _ in eng.generate(GenerationRequest(f"r{i}", prompts[i % 32], params)):
                            pass
                t = time.perf_counter()
                await asyncio.gather(*[worker() for _ in range(c)])
                return n * T / (time.perf_counter() - t)

            asyncio.run(closed_loop(4, 8))   # warm-up
            key = "packed" if packed else "unpacked"
            res[f"engine_c1_{key}"] = asyncio.run(closed_loop(1, 4))
            res[f"engine_c32_{key}"] = asyncio.run(closed_loop(32, args.requests))
            eng.stop()
        for key in ("packed", "unpacked"):
            res[f"ratio_c1_{key}"] = res[f"engine_c1_{key}"] / res["generate_b1"]
            res[f"ratio_c32_{key}"] = res[f"engine_c32_{key}"] / res["generate_b32"]
        report["models"][shape] = res
        print(shape, json.dumps({k: round(v, 3) for k, v in res.items()}), flush=True)
        del lm, model
        if dev == "cuda":
            torch.cuda.empty_cache()
    out = Path(args.output) if args.output else ROOT / "bench-results" / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True, parents=True)
    out.write_text(json.dumps(report, indent=2))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
