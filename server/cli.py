"""`chatserve serve` and `chatserve bench`."""
from __future__ import annotations

import argparse
import logging
import os
import sys

SERVE_DEFAULTS = dict(model=None, served_model_name=None, host="127.0.0.1", port=8000, device="auto",
                      dtype="auto", api_key=None, max_model_len=None, max_running=32, max_waiting=256,
                      queue_timeout=300.0, prefill_chunk=512, max_newcomers=1, prefix_cache=True, packed=True,
                      block_size=16, kv_cache_memory_fraction=None, kv_cache_gb=None, log_level="info")


def _serve_parser(p: argparse.ArgumentParser) -> None:
    # defaults are None so a --config file can fill what the command line leaves out
    p.add_argument("--config", help="YAML preset (configs/NAME.yaml); flags given here override it")
    p.add_argument("--model", help="folder, .gguf file or pypi:PACKAGE/FILE.gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", help="model id reported by /v1/models")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1/* (or set CHATSERVE_API_KEY)")
    p.add_argument("--max-model-len", type=int, help="context length cap (prompt + completion tokens)")
    p.add_argument("--max-running", type=int, help="sequences decoded together (default 32)")
    p.add_argument("--max-waiting", type=int, help="queued requests beyond the running ones; more get 429 (default 256)")
    p.add_argument("--queue-timeout", type=float, help="seconds a request may wait to start before a 503 (default 300)")
    p.add_argument("--prefill-chunk", type=int, help="prompt tokens prefilled per engine step (default 512)")
    p.add_argument("--max-newcomers", type=int,
                   help="prompts started per step while others decode (default 1; more when many wait for free rows)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_const", const=False,
                   help="do not reuse KV blocks between prompts that start the same way")
    p.add_argument("--kv-cache-memory-fraction", type=float,
                   help="CUDA: share of the memory free after loading the model that the KV pool takes (default 0.9)")
    p.add_argument("--kv-cache-gb", type=float, help="the KV pool's size in GiB (default off CUDA: 1)")
    p.add_argument("--block-size", type=int, help="tokens per KV block (default 16)")
    p.add_argument("--no-packed", dest="packed", action="store_const", const=False,
                   help="fallback engine path: prefill each prompt in its own forward, a padded decode cache, "
                        "no KV pool")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def resolve_serve_args(args: argparse.Namespace) -> dict:
    """Defaults <- config file <- command line."""
    settings = dict(SERVE_DEFAULTS)
    if args.config:
        import yaml
        with open(args.config) as f:
            data = yaml.safe_load(f) or {}
        unknown = set(k.replace("-", "_") for k in data) - set(SERVE_DEFAULTS)
        if unknown:
            raise SystemExit(f"{args.config}: unknown keys {sorted(unknown)}")
        settings.update({k.replace("-", "_"): v for k, v in data.items()})
    settings.update({k: v for k, v in vars(args).items() if k in SERVE_DEFAULTS and v is not None})
    if settings["api_key"] is None:
        settings["api_key"] = os.environ.get("CHATSERVE_API_KEY") or None
    return settings


def build_app(settings: dict):
    """Load the model, start the engine, and return (app, engine)."""
    from engine.engine import Engine, EngineConfig
    from engine.loader import load_model

    from .app import create_app

    loaded = load_model(settings["model"], served_model_name=settings["served_model_name"],
                        device=settings["device"], dtype=settings["dtype"],
                        max_model_len=settings["max_model_len"])
    engine = Engine(loaded, EngineConfig(max_running=settings["max_running"], max_waiting=settings["max_waiting"],
                                         queue_timeout=settings["queue_timeout"],
                                         prefill_chunk=settings["prefill_chunk"],
                                         max_newcomers=settings["max_newcomers"],
                                         prefix_cache=settings["prefix_cache"], packed=settings["packed"],
                                         block_size=settings["block_size"],
                                         kv_cache_memory_fraction=settings["kv_cache_memory_fraction"],
                                         kv_cache_gb=settings["kv_cache_gb"])).start()
    return create_app(engine, api_key=settings["api_key"]), engine


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = resolve_serve_args(args)
    logging.basicConfig(level=settings["log_level"].upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app, engine = build_app(settings)
    logging.getLogger("chatserve").info("serving %s on http://%s:%d/v1%s", engine.model_name, settings["host"],
                                        settings["port"], " (API key required)" if settings["api_key"] else "")
    try:
        uvicorn.run(app, host=settings["host"], port=settings["port"], log_level=settings["log_level"])
    finally:
        engine.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatserve", description="OpenAI-compatible chat completion server")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub.add_parser("serve", help="serve a model on /v1/chat/completions"))
    from . import bench
    bench.add_arguments(sub.add_parser("bench", help="load-test any OpenAI-compatible endpoint"))
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
