"""`chatserve serve` settings: defaults <- --config files <- command-line flags, for the server and
for each model it serves.

Settings are server-wide (where and how it listens, auth, logs, CORS, image limits, draining) or
per model (what to load and how its engine runs). A config file is either one model's settings
(any key, as before several models could be served) or several: a top-level `models:` list whose
items hold per-model keys, beside server-wide keys and per-model defaults for every item at the top
level. `--config` may be given several times: each file adds its model(s), in order. A flag on the
command line overrides the files: a server-wide flag the server's setting, a per-model flag every
model's; flags that pick one model (`--model`, `--served-model-name`, `--revision`, `--gguf-file`)
are refused when several models are configured. Two files setting one server-wide key to
different values is an error, as is a name served by two models.

Every mistake is a ``ConfigError``: one line naming the file (and item) and the key.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
# accelerate's placements of a model too big for one GPU (or a mapping: module name -> device)
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "sequential")

SERVE_DEFAULTS = dict(
    model=None,
    revision=None,
    gguf_file=None,
    served_model_name=None,
    aliases=None,
    host="127.0.0.1",
    port=8000,
    device="auto",
    dtype="auto",
    api_key=None,
    max_model_len=None,
    max_running=32,
    max_waiting=256,
    queue_timeout=300.0,
    prefill_chunk=None,
    max_newcomers=None,
    prefix_cache=True,
    packed=True,
    enforce_eager=False,
    compile=False,
    block_size=16,
    kv_cache_memory_fraction=None,
    kv_cache_gb=None,
    body_read_timeout=30.0,
    limit_images_per_request=8,
    max_image_bytes=20 * 2**20,
    max_image_pixels=40_000_000,
    image_fetch_timeout=10.0,
    allowed_media_domains=None,
    log_level="info",
    log_format="text",
    allowed_origins=None,
)
SERVE_DEFAULTS.update(playground=True)  # the browser page at / and /playground
SERVE_DEFAULTS.update(drain_timeout=30.0, protect_metrics=False)
# constraint compiles (response_format json_schema / tools): see engine/constraints/limits.py
SERVE_DEFAULTS.update(
    compile_timeout=10.0,
    compile_workers=2,
    compile_memory_gb=4.0,
    max_constraint_regex=100_000,
    max_constraint_states=None,
    max_constraint_transitions=10_000_000,
)
SERVE_DEFAULTS.update(device_map=None)  # spread the model over the GPUs (engine/loader.py)
# the model and the step loop in a child process (engine/remote.py): no GIL shared with the HTTP side
SERVE_DEFAULTS.update(engine_process=False)

SERVER_KEYS = frozenset(
    {
        "host",
        "port",
        "api_key",
        "body_read_timeout",
        "limit_images_per_request",
        "max_image_bytes",
        "max_image_pixels",
        "image_fetch_timeout",
        "allowed_media_domains",
        "log_level",
        "log_format",
        "allowed_origins",
        "playground",
        "drain_timeout",
        "protect_metrics",
        "compile_timeout",
    }
)
MODEL_KEYS = frozenset(SERVE_DEFAULTS) - SERVER_KEYS
# keys that pick one model: not defaults for every item of a `models:` list, nor flags for several
ONE_MODEL_KEYS = frozenset({"model", "revision", "gguf_file", "served_model_name", "aliases"})

_NUMBER = (int, float)
_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "revision": (str,),
    "gguf_file": (str,),
    "served_model_name": (str, list),
    "aliases": (str, list),
    "host": (str,),
    "port": (int,),
    "device": (str,),
    "dtype": (str,),
    "device_map": (str, dict),
    "api_key": (str,),
    "max_model_len": (int,),
    "max_running": (int,),
    "max_waiting": (int,),
    "queue_timeout": _NUMBER,
    "prefill_chunk": (int,),
    "max_newcomers": (int,),
    "prefix_cache": (bool,),
    "packed": (bool,),
    "enforce_eager": (bool,),
    "compile": (bool,),
    "block_size": (int,),
    "kv_cache_memory_fraction": _NUMBER,
    "kv_cache_gb": _NUMBER,
    "body_read_timeout": _NUMBER,
    "limit_images_per_request": (int,),
    "max_image_bytes": (int,),
    "max_image_pixels": (int,),
    "image_fetch_timeout": _NUMBER,
    "allowed_media_domains": (list,),
    "log_level": (str,),
    "log_format": (str,),
    "allowed_origins": (str, list),
    "playground": (bool,),
    "drain_timeout": _NUMBER,
    "protect_metrics": (bool,),
    "compile_timeout": _NUMBER,
    "compile_workers": (int,),
    "compile_memory_gb": _NUMBER,
    "max_constraint_regex": (int,),
    "max_constraint_states": (int,),
    "max_constraint_transitions": (int,),
    "engine_process": (bool,),
}
_CHOICES = {"device": DEVICES, "dtype": DTYPES, "log_level": LOG_LEVELS, "log_format": LOG_FORMATS}
assert set(_TYPES) == set(SERVE_DEFAULTS)


class ConfigError(Exception):
    """A settings mistake, said in one line: where (file, item), the key, what is wrong."""


@dataclass
class ServeSettings:
    server: dict  # server-wide settings
    models: list[dict]  # one dict of per-model settings per model, in order
    origins: list[str] = field(default_factory=list)  # where each model was configured ("a.yaml: models[1]")

    def flat(self, i: int = 0) -> dict:
        """Model i's settings and the server's, in one dict."""
        return {**self.server, **self.models[i]}


# ------------------------------------------------------------------------------------ reading files
def _read(path: str) -> dict:
    import yaml

    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML: {at}{problem}") from None
    if data is None:
        return {}
    return _mapping(data, path)


def _mapping(data, where: str) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected settings as `key: value` lines, got a {_kind(data)}")
    out = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: {key!r}: keys are setting names (strings)")
        out[key.replace("-", "_")] = value
    return out


def _kind(value) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number", dict: "mapping"}.get(
        type(value), type(value).__name__
    )


def _check_keys(data: dict, allowed: frozenset, where: str, *, in_item: bool = False, multi: bool = False) -> None:
    for key in data:
        if key in allowed:
            continue
        if in_item and key in SERVER_KEYS:
            raise ConfigError(f"{where}: {key}: a server-wide setting; set it at the top level of the file")
        if multi and key in ONE_MODEL_KEYS:
            raise ConfigError(f"{where}: {key}: names one model; set it in each item of `models`")
        near = difflib.get_close_matches(key, [*SERVE_DEFAULTS, "models"], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"{where}: unknown key {key!r}{hint}")


_MAP_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def _check_device_map(value, where: str) -> None:
    if isinstance(value, str):
        if value not in DEVICE_MAP_STRATEGIES:
            raise ConfigError(
                f"{where}: device_map: expected one of {', '.join(DEVICE_MAP_STRATEGIES)} or a mapping of "
                f"module name to device, got {value!r}"
            )
        return
    if not value:
        raise ConfigError(f"{where}: device_map: an empty mapping places nothing; give module name: device")
    for module, dev in value.items():
        gpu = isinstance(dev, int) and not isinstance(dev, bool) and dev >= 0
        if not isinstance(module, str) or not (gpu or (isinstance(dev, str) and _MAP_DEVICE.match(dev))):
            raise ConfigError(f"{where}: device_map: {module!r}: expected a GPU number, cuda:N or cpu, got {dev!r}")


def _check_value(key: str, value, where: str) -> None:
    types = _TYPES[key]
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if ok and isinstance(value, list):
        ok = bool(value) and all(isinstance(v, str) and v for v in value)
    if not ok:
        want = (
            "a number"
            if types == _NUMBER
            else " or ".join(
                {
                    str: "a string",
                    int: "an integer",
                    bool: "true or false",
                    list: "a list of strings",
                    dict: "a mapping",
                }[t]
                for t in types
            )
        )
        raise ConfigError(f"{where}: {key}: expected {want}, got {value!r}")
    if key == "device_map":
        _check_device_map(value, where)
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"{where}: {key}: expected one of {', '.join(_CHOICES[key])}, got {value!r}")


def _given(data: dict, where: str) -> dict:
    """The keys set to something (`key:` with no value, null, means: the default), checked."""
    data = {k: v for k, v in data.items() if v is not None}
    for key, value in data.items():
        _check_value(key, value, where)
    return data


# ------------------------------------------------------------------------------------ resolving
def _names(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _origins(value) -> list[str]:
    """--allowed-origins: comma-separated, repeatable (flags) or a list (files)."""
    return [o.strip() for part in _names(value) for o in part.split(",") if o.strip()]


def resolve(args: argparse.Namespace) -> ServeSettings:
    """Every setting of the server and of each model (see the module docstring)."""
    configs = args.config if isinstance(args.config, list) else [args.config] if args.config else []
    flags = {k: v for k, v in vars(args).items() if k in SERVE_DEFAULTS and v is not None}
    server: dict = {}
    server_from: dict[str, str] = {}
    models: list[tuple[str, dict]] = []
    for path in configs:
        data = _read(path)
        if "models" in data:
            items = data.pop("models")
            if not isinstance(items, list) or not items:
                raise ConfigError(
                    f"{path}: models: expected a list of models (each a mapping of settings), got {items!r}"
                )
            _check_keys(data, SERVER_KEYS | (MODEL_KEYS - ONE_MODEL_KEYS), path, multi=True)
            data = _given(data, path)
            shared = {k: v for k, v in data.items() if k in MODEL_KEYS}
            for i, item in enumerate(items):
                where = f"{path}: models[{i}]"
                item = _mapping(item, where)
                _check_keys(item, MODEL_KEYS, where, in_item=True)
                models.append((where, {**shared, **_given(item, where)}))
        else:
            _check_keys(data, SERVER_KEYS | MODEL_KEYS, path)
            data = _given(data, path)
            models.append((path, {k: v for k, v in data.items() if k in MODEL_KEYS}))
        for key in SERVER_KEYS & set(data):
            if key in server and server[key] != data[key]:
                raise ConfigError(
                    f"{path}: {key}: {data[key]!r} conflicts with {server_from[key]}'s {server[key]!r} "
                    "(a server-wide setting: give it once)"
                )
            server[key], server_from[key] = data[key], path
    if not models:
        models = [("the command line", {})]
    if len(models) > 1:
        picked = sorted(ONE_MODEL_KEYS & set(flags))
        if picked:
            raise ConfigError(
                f"--{picked[0].replace('_', '-')}: names one model, and {len(models)} are configured "
                f"({', '.join(w for w, _ in models)}); set it in each model's config"
            )

    out_server = {k: v for k, v in SERVE_DEFAULTS.items() if k in SERVER_KEYS}
    out_server.update(server)
    out_server.update({k: v for k, v in flags.items() if k in SERVER_KEYS})
    if out_server["api_key"] is None:
        out_server["api_key"] = os.environ.get("CHATSERVE_API_KEY") or None
    out_server["allowed_origins"] = _origins(out_server["allowed_origins"])

    out_models = []
    for _where, m in models:
        s = {k: v for k, v in SERVE_DEFAULTS.items() if k in MODEL_KEYS}
        s.update(m)
        s.update({k: v for k, v in flags.items() if k in MODEL_KEYS})
        names = _names(s["served_model_name"]) + _names(s["aliases"])
        s["served_model_name"] = names[0] if names else None
        s["aliases"] = list(dict.fromkeys(names[1:]))
        out_models.append(s)
    _check_unique_names(out_models, [w for w, _ in models])
    return ServeSettings(server=out_server, models=out_models, origins=[w for w, _ in models])


def _check_unique_names(models: list[dict], origins: list[str]) -> None:
    """No name given (served_model_name, aliases) to two models. Names the loader derives (from a
    folder or file name) are checked once the models are loaded (server/cli.py)."""
    owner: dict[str, str] = {}
    for where, s in zip(origins, models):
        for key, names in (("served_model_name", _names(s["served_model_name"])), ("aliases", s["aliases"])):
            for name in names:
                other = owner.get(name)
                if other is not None and other != where:
                    raise ConfigError(f"{where}: {key}: {name!r} is also a name of {other}'s model")
                owner[name] = where


def resolve_one(args: argparse.Namespace) -> dict:
    """The settings of a one-model server (the server's and the model's) in one dict."""
    s = resolve(args)
    if len(s.models) != 1:
        raise ConfigError(f"{len(s.models)} models are configured ({', '.join(s.origins)}); expected one")
    return s.flat(0)


def kv_fractions(shares: list[float | None], default_total: float = 0.9) -> list[float]:
    """Several models on one GPU, their KV pools sized as shares of the memory free once every model
    is loaded (a model's kv_cache_memory_fraction, or an equal part of ``default_total`` for those
    that set none), made one after another: each engine sizes its pool from the memory free when
    it is built, so the k-th gets its share over what the earlier ones left."""
    unset = [s for s in shares if s is None]
    set_total = sum(s for s in shares if s is not None)
    fill = (default_total - set_total) / len(unset) if unset else 0.0
    if unset and fill <= 0:
        raise ConfigError(
            f"kv_cache_memory_fraction: the models that set it take {set_total:g} of the free GPU "
            f"memory, leaving nothing of the default {default_total:g} for the {len(unset)} that do not"
        )
    wanted = [fill if s is None else s for s in shares]
    if sum(wanted) > 1 + 1e-9:
        raise ConfigError(
            f"kv_cache_memory_fraction: the models on the GPU ask for {sum(wanted):g} of its free "
            "memory in all (at most 1)"
        )
    out, taken = [], 0.0
    for w in wanted:
        out.append(min(1.0, w / (1 - taken)))
        taken += w
    return out
