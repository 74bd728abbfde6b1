"""chatserve on a CUDA device against model.generate and transformers' continuous batching, one run.

No weights reach the GPU machines, so the models are random-weight Llamas of real shapes (Llama-3
8B and 1B, vocabulary 128256, so lm_head and sampling cost what they cost in production), built
on the device, with a word-level tokenizer of the same size. Every request makes exactly
--max-tokens tokens (ignore_eos). One JSON line per figure; the last line sums up against the
targets of the GPU-engine issue. Figures, for each shape:

* hbm_copy: the card's device-to-device copy rate; roofline_tok_s = that rate / weight bytes
  (the single-stream ceiling: every decode step reads every weight once).
* generate: ``model.generate`` on a static batch of c prompts (greedy).
* engine: the engine in process, closed loop with c requests in flight (c = 1, 32, 64), CUDA
  graphs on (the default), with --compile (torch.compile over the decoder layers) and with
  enforce_eager (the ratio is what graphs buy); tokens/s and TTFT p50; start-up (capture, compile) time.
* long_context: c=8 requests of 128-token and of --long-prompt-token prompts: decode tokens/s
  while all 8 decode together (between the last first token and the first finish), and the fall.
* http: the whole server (FastAPI + SSE) in this process, loaded from a subprocess with
  server.bench's run_load (128-word prompts), c = 1, 32, 64.
* with --engine-process: the closed loop and the HTTP load again with the engine in its own
  process (engine/remote.py; the same weights, built there), and per c a summary line: in process,
  HTTP with the engine thread, HTTP with the engine process (issue #8: HTTP within 10%).
* transformers_cb: ``model.init_continuous_batching`` (what ``transformers serve
  --continuous-batching`` runs), all requests at once.

    python benchmarks/gpu_engine.py [--shapes 8b,1b] [--no-http] [--skip-cb] [--device cpu --shapes tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=5000,
    ),
}
TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + m['content'] + ' <|im_end|> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}"
)
LINES: list[dict] = []


def emit(**kv) -> dict:
    print(json.dumps(kv), flush=True)
    LINES.append(kv)
    return kv


def word_tokenizer(vocab: int, folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    table = {s: i for i, s in enumerate(specials)}
    table.update({f"w{i}": i for i in range(len(specials), vocab)})
    tok = Tokenizer(models.WordLevel(table, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    return fast


def closed_loop(engine, prompts, params, c: int, n: int, multimodal=None) -> dict:
    """c workers, n requests: tokens/s over the run, TTFT p50 and p90, and every event's time per
    request. ``multimodal``: request i's images (MultimodalInputs), i % len(prompts), beside its prompt."""
    from engine.request import GenerationRequest
    from server.bench.stats import percentile

    async def run():
        todo = list(range(n))
        ttfts, tokens, traces = [], 0, []

        async def worker():
            nonlocal tokens
            while todo:
                i = todo.pop()
                t_req = time.perf_counter()
                stamps = []
                mm = multimodal[i % len(prompts)] if multimodal else None
                async for ev in engine.generate(
                    GenerationRequest(f"r{i}-{time.time_ns()}", prompts[i % len(prompts)], params, multimodal=mm)
                ):
                    if ev.token_ids:
                        stamps.append((time.perf_counter(), len(ev.token_ids)))
                        tokens += len(ev.token_ids)
                    if ev.error:
                        raise RuntimeError(ev.error)
                ttfts.append(stamps[0][0] - t_req)
                traces.append(stamps)

        t = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(c)])
        return dict(
            tok_s=tokens / (time.perf_counter() - t),
            ttft_p50_ms=statistics.median(ttfts) * 1000,
            ttft_p90_ms=percentile(ttfts, 90) * 1000,
            traces=traces,
        )

    return asyncio.run(run())


def decode_window(traces) -> float:
    """Tokens/s while every request decodes: from the last first token to the first finish."""
    start = max(t[0][0] for t in traces)
    end = min(t[-1][0] for t in traces)
    count = sum(k for t in traces for when, k in t if start < when <= end)
    return count / (end - start) if end > start else float("nan")


UVICORN_HTTP = "auto"  # uvicorn's HTTP implementation: auto (httptools when installed), h11, httptools


def http_load(engine, shape: str, words: list, levels, T: int, **labels) -> None:
    """The server in this process, loaded from a subprocess with run_load; ``words``: the prompts (a
    string, or a messages list); ``labels`` go into every line emitted."""
    import uvicorn

    from server.app import create_app

    with socket.socket() as sock:  # a free port (a fixed one hung the run when another process held it)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning", http=UVICORN_HTTP)
    server = uvicorn.Server(config)
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        if not th.is_alive():
            raise RuntimeError(f"the HTTP server did not start on port {port}")
        time.sleep(0.1)
    try:
        for c, n in levels:
            code = (
                "import asyncio, json, sys; from server.bench import run_load; "
                f"s = asyncio.run(run_load('http://127.0.0.1:{port}/v1', {shape!r}, {c}, {n}, {T}, "
                f"json.loads(sys.stdin.read()), ignore_eos=True, warmup=1)); "
                "s.pop('requests'); print(json.dumps(s))"
            )
            r = subprocess.run(
                [sys.executable, "-c", code],
                input=json.dumps(words),
                capture_output=True,
                text=True,
                timeout=300,
                cwd=str(ROOT),
            )
            try:
                s = json.loads(r.stdout.strip().splitlines()[-1])
                emit(
                    what="http",
                    shape=shape,
                    **labels,
                    c=c,
                    requests=n,
                    ok=s["ok"],
                    tok_s=s["output_throughput"],
                    ttft_p50_ms=s["ttft_ms"]["p50"],
                    ttft_p90_ms=s["ttft_ms"]["p90"],
                    tpot_p50_ms=s["tpot_ms"]["p50"],
                    prompt_tokens=s["total_prompt_tokens"] / s["ok"] if s["ok"] and s["total_prompt_tokens"] else None,
                )
            except Exception:  # noqa: BLE001
                emit(what="http_error", shape=shape, **labels, c=c, out=(r.stdout + r.stderr)[-800:])
    finally:
        server.should_exit = True
        th.join(timeout=10)


def transformers_cb(model, prompts, shape: str, T: int, levels) -> None:
    from transformers import GenerationConfig

    try:
        gc = GenerationConfig(max_new_tokens=T, do_sample=False, eos_token_id=-1, pad_token_id=0)
        for impl in ("paged|sdpa", "sdpa"):
            try:
                model.set_attn_implementation(impl)
                break
            except Exception as e:  # noqa: BLE001
                emit(what="cb_note", shape=shape, note=f"set_attn_implementation({impl}): {e!r}"[:300])
        mgr = model.init_continuous_batching(generation_config=gc)
        t = time.perf_counter()
        mgr.warmup() if hasattr(mgr, "warmup") else None
        mgr.start()
        emit(what="transformers_cb_warmup", shape=shape, s=time.perf_counter() - t)

        def run(n: int) -> float:
            t = time.perf_counter()
            mgr.add_requests(inputs=prompts[:n], max_new_tokens=T)
            done = ntok = 0
            while done < n:
                r = mgr.get_result(timeout=10)
                if r is None:
                    raise TimeoutError(f"{done}/{n} finished")
                if r.is_finished():
                    done += 1
                    ntok += len(r.generated_tokens)
            return ntok / (time.perf_counter() - t)

        run(8)
        for n in levels:
            emit(
                what="transformers_cb",
                shape=shape,
                requests_at_once=n,
                tok_s=statistics.median(run(n) for _ in range(2)),
            )
        mgr.stop(block=True, timeout=10)
    except Exception as e:  # noqa: BLE001
        emit(what="transformers_cb_error", shape=shape, error=repr(e)[:500])
    finally:
        model.set_attn_implementation("sdpa")


def core_model(shape: str, device: str, dtype: str, max_model_len: int, long_prompt: int):
    """The random-weight model of ``shape`` as a LoadedModel, built in the engine core process
    (--engine-process; engine/remote.py): the config and seed main() uses, so the same weights."""
    import torch

    from engine.loader import LoadedModel

    model, tok = build_model(shape, device, getattr(torch, dtype), long_prompt)
    return LoadedModel(model, tok, shape, device, dtype, max_model_len, shape, 0.0)


def build_model(shape: str, device: str, dtype, long_prompt: int):
    """The random-weight Llama of ``shape`` (seed 0) on ``device``, and its word tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(SHAPES[shape])
    V = kw.pop("vocab_size")
    tok = word_tokenizer(V, Path(tempfile.mkdtemp()))
    cfg = LlamaConfig(
        vocab_size=V,
        max_position_embeddings=max(4096, 2 * long_prompt),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        **kw,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval(), tok


def engine_process_ab(shape: str, args, max_model_len: int, prompts, params, levels, T: int, P: int) -> None:
    """Issue #8's A/B: the closed loop and the HTTP load again, the engine in its own process. Lines
    with mode="process" (closed loop) and core="process" (HTTP), then one summary line per c."""
    from engine.engine import EngineConfig
    from engine.remote import RemoteEngine, launch_core

    t = time.perf_counter()
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    core = launch_core(core_model, shape, args.device, dtype, max_model_len, args.long_prompt)
    eng = RemoteEngine(core, EngineConfig(max_running=max(levels), prefix_cache=False)).start()
    emit(what="engine_start", shape=shape, mode="process", s=time.perf_counter() - t)
    start = len(LINES)
    try:
        closed_loop(eng, prompts, params, 4, 8)  # warm-up
        for c in levels:
            n = 4 if c == 1 else 3 * c
            r = closed_loop(eng, prompts, params, c, n)
            emit(
                what="engine",
                shape=shape,
                mode="process",
                c=c,
                requests=n,
                tok_s=r["tok_s"],
                ttft_p50_ms=r["ttft_p50_ms"],
            )
        if not args.no_http:
            words = [" ".join(f"w{t}" for t in p[: P - 8]) for p in prompts[:64]]
            http_load(eng, shape, words, [(c, 4 if c == 1 else 3 * c) for c in levels], T, core="process")
        stats = {k: v for k, v in eng.stats.items() if k.startswith(("time_", "graph", "decode"))}
        emit(what="engine_stats", shape=shape, mode="process", **stats)
    finally:
        eng.stop()

    def find(what, **kv):
        hits = [x for x in LINES if x.get("what") == what and x.get("shape") == shape]
        hits = [x for x in hits if all(x.get(k) == v for k, v in kv.items())]
        return hits[-1]["tok_s"] if hits else None

    for c in levels:
        thread_http = [x for x in LINES[:start] if x.get("what") == "http" and x.get("shape") == shape and x["c"] == c]
        inproc, http_p = find("engine", mode="graphs", c=c), find("http", core="process", c=c)
        emit(
            what="engine_process_summary",
            shape=shape,
            c=c,
            in_process_tok_s=inproc,
            process_direct_tok_s=find("engine", mode="process", c=c),
            http_thread_tok_s=thread_http[-1]["tok_s"] if thread_http else None,
            http_process_tok_s=http_p,
            http_process_over_in_process=http_p / inproc if http_p and inproc else None,  # target >= 0.9
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8b,1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--long-prompt", type=int, default=8000)
    ap.add_argument("--levels", default="1,32,64", help="concurrency levels (requests: 4, then 3 per row)")
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument("--no-eager", action="store_true", help="skip the enforce_eager comparison")
    ap.add_argument("--skip-cb", action="store_true", help="skip transformers' continuous batching")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also run the engine with compile=True (torch.compile over the decoder layers, engine/compiled.py)",
    )
    ap.add_argument("--output", default=None, help="also write every line to this JSON file")
    ap.add_argument(
        "--engine-process",
        action="store_true",
        help="after the in-process runs, the same closed loop and HTTP load with the engine in its own "
        "process (engine/remote.py), and a summary line per concurrency (issue #8)",
    )
    ap.add_argument(
        "--switch-interval",
        type=float,
        default=0.005,
        help="sys.setswitchinterval: how long the event loop may hold the GIL while the engine thread "
        "waits for it after a CUDA sync (Python's default 0.005 s)",
    )
    ap.add_argument(
        "--uvicorn-http",
        choices=["auto", "h11", "httptools"],
        default="auto",
        help="uvicorn's HTTP implementation for the HTTP figures (auto: httptools, a dependency)",
    )
    args = ap.parse_args()
    sys.setswitchinterval(args.switch_interval)
    global UVICORN_HTTP
    UVICORN_HTTP = args.uvicorn_http

    import torch
    import transformers

    from engine.engine import Engine, EngineConfig
    from engine.loader import LoadedModel
    from engine.request import SamplingParams

    dev, cuda = args.device, args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    emit(
        what="env",
        torch=torch.__version__,
        transformers=transformers.__version__,
        gpu=torch.cuda.get_device_name(0) if cuda else "cpu",
    )
    hbm = None
    if cuda:
        a = torch.empty(2**31, dtype=torch.bfloat16, device=dev)
        b = torch.empty_like(a)
        for _ in range(3):
            b.copy_(a)
        sync()
        t = time.perf_counter()
        for _ in range(10):
            b.copy_(a)
        sync()
        hbm = 2 * a.numel() * 2 / ((time.perf_counter() - t) / 10)
        emit(what="hbm_copy", tb_s=hbm / 1e12)
        del a, b
        torch.cuda.empty_cache()
    T, P, L = args.max_tokens, args.prompt_len, args.long_prompt
    levels = [int(c) for c in args.levels.split(",")]
    dtype = torch.bfloat16 if cuda else torch.float32
    summary = {}
    for shape in args.shapes.split(","):
        V = SHAPES[shape]["vocab_size"]
        t0 = time.perf_counter()
        model, tok = build_model(shape, dev, dtype, L)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        emit(
            what="model",
            shape=shape,
            params_b=sum(p.numel() for p in model.parameters()) / 1e9,
            weight_gb=weight_bytes / 1e9,
            build_s=time.perf_counter() - t0,
            roofline_tok_s=hbm / weight_bytes if hbm else None,
        )
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, V, (P,), generator=g).tolist() for _ in range(256)]

        def generate(n: int, model=model, prompts=prompts) -> float:
            ids = torch.tensor(prompts[:n], device=dev)
            sync()
            t = time.perf_counter()
            with torch.inference_mode():
                model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=T,
                    min_new_tokens=T,
                    do_sample=False,
                    pad_token_id=0,
                )
            sync()
            return n * T / (time.perf_counter() - t)

        for n in levels:
            generate(n)
            emit(what="generate", shape=shape, batch=n, tok_s=statistics.median(generate(n) for _ in range(2)))

        lm = LoadedModel(
            model=model,
            tokenizer=tok,
            name=shape,
            device=dev,
            dtype=str(dtype).removeprefix("torch."),
            max_model_len=L + 2 * T + 64,
            source=shape,
            load_seconds=0.0,
        )
        params = SamplingParams(temperature=0, max_tokens=T, ignore_eos=True)
        runs = [("graphs", False, False)]
        runs += [] if args.no_eager else [("eager", True, False)]
        runs += [("compiled", False, True)] if args.compile else []  # last: it compiles the model in place
        for mode, eager, compiled in runs:
            t = time.perf_counter()
            config = EngineConfig(max_running=max(levels), prefix_cache=False, enforce_eager=eager, compile=compiled)
            eng = Engine(lm, config).start()
            emit(
                what="engine_start",
                shape=shape,
                mode=mode,
                s=time.perf_counter() - t,
                graphs=sorted(eng.graphs.graphs) if eng.graphs is not None else None,
            )
            closed_loop(eng, prompts, params, 4, 8)  # warm-up
            for c in levels:
                n = 4 if c == 1 else 3 * c
                r = closed_loop(eng, prompts, params, c, n)
                summary[(shape, mode, c)] = r["tok_s"]
                emit(
                    what="engine",
                    shape=shape,
                    mode=mode,
                    c=c,
                    requests=n,
                    tok_s=r["tok_s"],
                    ttft_p50_ms=r["ttft_p50_ms"],
                )
            if mode == "graphs":
                long_params = SamplingParams(temperature=0, max_tokens=3 * T, ignore_eos=True)
                rates = {}
                for length in (P, L):
                    ps = [torch.randint(3, V, (length,), generator=g).tolist() for _ in range(8)]
                    r = closed_loop(eng, ps, long_params, 8, 8)
                    rates[length] = decode_window(r["traces"])
                    emit(
                        what="long_context",
                        shape=shape,
                        c=8,
                        prompt_tokens=length,
                        decode_tok_s=rates[length],
                        ttft_p50_ms=r["ttft_p50_ms"],
                    )
                emit(what="long_context_fall", shape=shape, fall=1 - rates[L] / rates[P])
                if not args.no_http:
                    words = [" ".join(f"w{t}" for t in p[: P - 8]) for p in prompts[:64]]
                    http_load(eng, shape, words, [(c, 4 if c == 1 else 3 * c) for c in levels], T)
            emit(
                what="engine_stats",
                shape=shape,
                mode=mode,
                **{k: v for k, v in eng.stats.items() if k.startswith(("time_", "graph", "decode"))},
            )
            eng.stop()
            del eng
            if cuda:
                torch.cuda.empty_cache()
            if mode == "graphs" and args.engine_process:  # the in-process pool is freed: room for the core's
                engine_process_ab(shape, args, lm.max_model_len, prompts, params, levels, T, P)
        if not args.skip_cb:
            transformers_cb(model, prompts, shape, T, levels)
        del lm, model
        if cuda:
            torch.cuda.empty_cache()
    if args.output:
        Path(args.output).write_text(json.dumps(LINES, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
