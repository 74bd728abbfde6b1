"""`chatserve serve` and `chatserve bench`. What the settings are and how files and flags combine:
server/settings.py."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time

from .settings import (  # noqa: F401
    DEVICE_MAP_STRATEGIES,
    DEVICES,
    DTYPES,
    LOG_FORMATS,
    LOG_LEVELS,
    SERVE_DEFAULTS,
    ConfigError,
    ServeSettings,
    kv_fractions,
    resolve,
    resolve_one,
)


def _serve_parser(p: argparse.ArgumentParser) -> None:
    # defaults are None so a --config file can fill what the command line leaves out
    p.add_argument(
        "--config",
        action="append",
        help="YAML preset (configs/NAME.yaml); flags given here override it. Repeat it to serve several "
        "models, or list them in one file under `models:`",
    )
    p.add_argument(
        "--model",
        help="folder, .gguf file, pypi:PACKAGE/FILE.gguf or a Hub id ORG/NAME[:FILE.gguf] "
        "(default: SmolLM2-135M-Instruct)",
    )
    p.add_argument("--revision", help="Hub model: branch, tag or commit (default: main)")
    p.add_argument("--gguf-file", help="Hub model or folder: the GGUF file in it to load")
    p.add_argument(
        "--served-model-name",
        nargs="+",
        metavar="NAME",
        help="model id reported by /v1/models and accepted in `model`; more names are aliases",
    )
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--device", choices=DEVICES)
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument(
        "--device-map",
        choices=DEVICE_MAP_STRATEGIES,
        help="spread a model too big for one GPU over the GPUs (accelerate): its layers run one GPU after "
        "another, each with its own KV; --device then only picks the default dtype. A config file may give "
        "a mapping of module name to device instead",
    )
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1/* (or set CHATSERVE_API_KEY)")
    p.add_argument("--max-model-len", type=int, help="context length cap (prompt + completion tokens)")
    p.add_argument("--max-running", type=int, help="sequences decoded together (default 32)")
    p.add_argument(
        "--max-waiting", type=int, help="queued requests beyond the running ones; more get 429 (default 256)"
    )
    p.add_argument("--queue-timeout", type=float, help="seconds a request may wait to start before a 503 (default 300)")
    p.add_argument(
        "--prefill-chunk", type=int, help="prompt tokens prefilled per engine step (default 512; on CUDA 2048)"
    )
    p.add_argument(
        "--max-newcomers",
        type=int,
        help="prompts started per step while others decode (default 1, more when many wait for free "
        "rows; on CUDA as many as the prefill chunk holds)",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_const",
        const=True,
        help="CUDA: no CUDA graphs; every decode step runs eagerly (slower; for debugging)",
    )
    p.add_argument(
        "--compile",
        action="store_const",
        const=True,
        help="torch.compile the model's decoder layers (fused norms, RoPE and activations; attention stays "
        "the paged kernel); costs start-up time (engine/compiled.py)",
    )
    p.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_const",
        const=False,
        help="do not reuse KV blocks between prompts that start the same way",
    )
    p.add_argument(
        "--kv-cache-memory-fraction",
        type=float,
        help="CUDA: share of the memory free after loading the model that the KV pool takes (default 0.9)",
    )
    p.add_argument("--kv-cache-gb", type=float, help="the KV pool's size in GiB (default off CUDA: 1)")
    p.add_argument("--block-size", type=int, help="tokens per KV block (default 16)")
    p.add_argument(
        "--engine-process",
        action="store_const",
        const=True,
        help="run the model and the engine's step loop in a child process, so it shares no GIL with the HTTP "
        "side (prompts, constraints and streams stay in the server process)",
    )
    p.add_argument(
        "--no-packed",
        dest="packed",
        action="store_const",
        const=False,
        help="fallback engine path: prefill each prompt in its own forward, a padded decode cache, no KV pool",
    )
    p.add_argument(
        "--body-read-timeout",
        type=float,
        help="seconds a client may take to send a request body before a 408 (default 30; 0: no limit)",
    )
    p.add_argument("--limit-images-per-request", type=int, help="images one request may hold (default 8)")
    p.add_argument("--max-image-bytes", type=int, help="largest encoded image, data: or fetched (default 20 MiB)")
    p.add_argument("--max-image-pixels", type=int, help="largest decoded image, width x height (default 40M)")
    p.add_argument("--image-fetch-timeout", type=float, help="seconds to fetch one http(s) image (default 10)")
    p.add_argument(
        "--allowed-media-domains",
        nargs="+",
        help="hosts images may be fetched from (and their subdomains); default: any",
    )
    p.add_argument(
        "--compile-timeout",
        type=float,
        help="seconds a new json_schema / tools constraint may take to compile before a 400 "
        "schema_too_complex; the worker process compiling it is killed (default 10; 0: no limit)",
    )
    p.add_argument(
        "--compile-workers",
        type=int,
        help="constraint compiles run at once, each in its own worker process on one core (default 2)",
    )
    p.add_argument(
        "--compile-memory-gb",
        type=float,
        help="address-space limit of each compile worker in GiB; a compile needing more is refused "
        "(default 4; 0: no limit)",
    )
    p.add_argument(
        "--max-constraint-regex",
        type=int,
        help="longest regex a schema or tool set may compile to, in characters, checked before any "
        "automaton is built; objects with no required properties grow with the square of their "
        "property count (default 100000; 0: no limit)",
    )
    p.add_argument(
        "--max-constraint-states",
        type=int,
        help="most automaton states a schema or tool set may compile to; each costs a walk over the "
        "whole vocabulary (default: 500M / vocabulary size, 10172 for 49k tokens; 0: no limit)",
    )
    p.add_argument(
        "--max-constraint-transitions",
        type=int,
        help="most token transitions a schema's index may hold, estimated before building it; the server "
        "keeps ~12 bytes per transition of every cached schema (default 10000000; 0: no limit)",
    )
    p.add_argument(
        "--no-playground",
        dest="playground",
        action="store_const",
        const=False,
        help="do not serve the browser playground at / and /playground (the /v1 API is unchanged)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        help="on SIGTERM: seconds running requests may take to finish while new ones get 503 and /ready "
        "says no; then exit 0 (default 30; a second SIGTERM exits at once)",
    )
    p.add_argument(
        "--protect-metrics",
        dest="protect_metrics",
        action="store_const",
        const=True,
        help="with --api-key, require the key on /metrics too",
    )
    p.add_argument("--log-level", choices=LOG_LEVELS)
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="text (default) or json: every log line one JSON object, the access line's fields as keys",
    )
    p.add_argument(
        "--allowed-origins",
        action="append",
        metavar="ORIGIN[,ORIGIN...]",
        help="browser origins allowed to call the API (CORS), e.g. https://app.example.com; "
        "comma-separated or repeated; * for any (default: none, no CORS headers)",
    )


def resolve_serve_args(args: argparse.Namespace) -> dict:
    """A one-model server's settings (the server's and the model's) in one dict: defaults <- config
    file <- command line. Several models: resolve_serve_settings."""
    return resolve_one(args)


def resolve_serve_settings(args: argparse.Namespace) -> ServeSettings:
    """The server's settings and each model's."""
    return resolve(args)


def build_app(settings: ServeSettings | dict):
    """Load every model, start their engines, and return (app, engines). A name two models end up
    with (one derived from a folder name, say) is a ConfigError; nothing stays running then."""
    from engine.loader import ModelLoadError, check_torchvision, load_model

    check_torchvision()  # before the engine's imports pull in transformers, which imports it

    from engine.engine import Engine, EngineConfig
    from engine.remote import RemoteEngine, RemoteModel, load_model_in_core

    from .app import create_app
    from .media import MediaLimits

    if isinstance(settings, dict):  # one model's and the server's settings in one dict
        settings = ServeSettings(server=settings, models=[settings], origins=["the command line"])
    server, several = settings.server, len(settings.models) > 1
    loaded, engines = [], []
    try:
        # every model first, then the engines: each sizes its KV pool from the memory left free
        taken: dict[str, str] = {}
        for where, m in zip(settings.origins, settings.models):
            for name in [m["served_model_name"], *m["aliases"]]:
                if name:
                    taken.setdefault(name, where)
        for where, m in zip(settings.origins, settings.models):
            try:
                lm = (load_model_in_core if m["engine_process"] else load_model)(
                    m["model"],
                    served_model_name=m["served_model_name"],
                    device=m["device"],
                    dtype=m["dtype"],
                    max_model_len=m["max_model_len"],
                    revision=m["revision"],
                    gguf_file=m["gguf_file"],
                    device_map=m["device_map"],
                )
            except ModelLoadError as exc:
                raise ModelLoadError(f"{where}: {exc}" if several else str(exc)) from None
            if taken.setdefault(lm.name, where) != where:
                raise ConfigError(
                    f"{where}: served_model_name: unset, and the name the model gets from where it "
                    f"was loaded, {lm.name!r}, is also a name of {taken[lm.name]}'s model; "
                    "give one of them a served_model_name"
                )
            loaded.append(lm)
        # several models on the GPU share its free memory; one alone keeps its own setting
        on_gpu = [
            i
            for i, (lm, m) in enumerate(zip(loaded, settings.models))
            if str(lm.device).startswith("cuda") and m["kv_cache_gb"] is None
        ]
        fractions = {i: m["kv_cache_memory_fraction"] for i, m in enumerate(settings.models)}
        if len(on_gpu) > 1:
            fractions.update(
                zip(on_gpu, kv_fractions([settings.models[i]["kv_cache_memory_fraction"] for i in on_gpu]))
            )
        # fixed-size pools first, so the shares are of what is left after them
        order = sorted(range(len(loaded)), key=lambda i: i in on_gpu)
        built = {}
        for i in order:
            m = settings.models[i]
            built[i] = (RemoteEngine if isinstance(loaded[i], RemoteModel) else Engine)(
                loaded[i],
                EngineConfig(
                    max_running=m["max_running"],
                    max_waiting=m["max_waiting"],
                    queue_timeout=m["queue_timeout"],
                    prefill_chunk=m["prefill_chunk"],
                    max_newcomers=m["max_newcomers"],
                    prefix_cache=m["prefix_cache"],
                    packed=m["packed"],
                    block_size=m["block_size"],
                    kv_cache_memory_fraction=fractions[i],
                    kv_cache_gb=m["kv_cache_gb"],
                    enforce_eager=m["enforce_eager"],
                    compile=m["compile"],
                ),
            ).start()
            engines.append(built[i])
        engines = [built[i] for i in range(len(loaded))]
        for engine, m in zip(engines, settings.models):
            _configure_constraints(engine, m)
    except BaseException:
        for engine in engines:
            engine.stop()
        for lm in loaded:  # engine core processes (those whose engine stopped are gone already)
            if isinstance(lm, RemoteModel):
                lm.close()
        raise
    media = MediaLimits(
        max_images=server["limit_images_per_request"],
        max_bytes=server["max_image_bytes"],
        max_pixels=server["max_image_pixels"],
        fetch_timeout=server["image_fetch_timeout"],
        allowed_domains=list(server["allowed_media_domains"] or []),
    )
    models = [([e.model_name, *m["aliases"]], e) for e, m in zip(engines, settings.models)]
    app = create_app(
        models,
        api_key=server["api_key"],
        body_read_timeout=server["body_read_timeout"],
        media=media,
        compile_timeout=server["compile_timeout"],
        playground=server["playground"],
        protect_metrics=server["protect_metrics"],
        allowed_origins=server["allowed_origins"],
    )
    return app, engines


def _configure_constraints(engine, settings: dict) -> None:
    """Constraint compile limits; also builds the compiler now, so its warm worker starts at launch
    and the json_object constraint is compiled before the first request asks for it."""
    from engine.constraints import ConstraintLimits

    try:
        compiler = engine.constraints
    except ValueError as exc:  # e.g. a tokenizer without an EOS token
        logging.getLogger("chatserve").warning("constrained decoding unavailable: %s", exc)
        return
    compiler.configure(
        limits=ConstraintLimits(
            max_regex_chars=settings["max_constraint_regex"],
            max_states=settings["max_constraint_states"],
            max_transitions=settings["max_constraint_transitions"],
        ),
        workers=settings["compile_workers"],
        worker_memory_bytes=int((settings["compile_memory_gb"] or 0) * 2**30) or None,
    )
    compiler.prewarm()  # json_object, in the background: no client waits for it


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .logs import configure_logging

    settings = resolve_serve_settings(args)  # a ConfigError goes up to main(): one line
    server = settings.server
    configure_logging(server["log_level"], server["log_format"])
    from engine.loader import ModelLoadError

    try:
        app, engines = build_app(settings)
    except ModelLoadError as exc:  # one line saying what is missing and how to get it, no traceback
        print(f"chatserve: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    logging.getLogger("chatserve").info(
        "serving %s on http://%s:%d/v1%s",
        ", ".join(repr(n) for n in app.state.models.served_names),
        server["host"],
        server["port"],
        " (API key required)" if server["api_key"] else "",
    )
    # log_config None: uvicorn's loggers write through the root handler configure_logging set (the
    # same format); its access log is off, as server/logs.py writes one line per request itself
    config = uvicorn.Config(
        app,
        host=server["host"],
        port=server["port"],
        log_level=server["log_level"],
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    runner = DrainingServer(config, app, engines, server["drain_timeout"])
    try:
        runner.run()
    finally:
        for engine in engines:
            engine.stop()
    return 0


def _draining_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, but the first SIGTERM/SIGINT drains: new requests get 503 and /ready says no while
        running ones finish (up to ``drain_timeout`` seconds), then the server exits as usual. A
        second signal exits at once."""

        def __init__(self, config, app, engines, drain_timeout: float):
            super().__init__(config)
            self.app, self.drain_timeout = app, drain_timeout
            self.engines = list(engines) if isinstance(engines, (list, tuple)) else [engines]
            self.draining = False

        def _load(self) -> tuple[int, int]:
            return (sum(e.num_running for e in self.engines), sum(e.num_waiting for e in self.engines))

        def handle_exit(self, sig, frame):
            if self.draining or not self.drain_timeout:
                return super().handle_exit(sig, frame)
            self.draining = True
            self.app.state.draining = True
            log = logging.getLogger("chatserve")
            log.info(
                "draining: %d running, %d waiting; new requests get 503 (up to %.0f s)",
                *self._load(),
                self.drain_timeout,
            )

            def drain():
                deadline = time.monotonic() + self.drain_timeout
                while time.monotonic() < deadline and any(self._load()):
                    time.sleep(0.05)
                left = sum(self._load())
                log.info("drained%s; shutting down", f" ({left} requests cut off at the deadline)" if left else "")
                self.should_exit = True

            threading.Thread(target=drain, name="chatserve-drain", daemon=True).start()

    return DrainingServer


def DrainingServer(config, app, engines, drain_timeout):  # noqa: N802 (a class, built lazily: uvicorn imports late)
    return _draining_server_class()(config, app, engines, drain_timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatserve", description="OpenAI-compatible chat completion server")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub.add_parser("serve", help="serve a model on /v1/chat/completions"))
    from . import bench

    bench.add_arguments(sub.add_parser("bench", help="load-test any OpenAI-compatible endpoint"))
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            return serve(args)
        except ConfigError as exc:  # one line naming the file and key, no traceback
            print(f"chatserve: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
