"""``--compile``: torch.compile over the model's decoder layers, attention left out.

A CUDA graph removes the launch overhead of a decode step, but not its kernels: the model's own
forward still runs RMSNorm, rotary embeddings and SiLU-times-up as several small kernels each, in
every layer. At batch 1 on an 8B model those kernels, not the weight reads, set the speed.
torch.compile (inductor) fuses them. What it must not trace is the paged part: the KV write
(``PagedStep.update``) and ``paged_attention`` read Python-side step layouts, so both run as
``torch.compiler.disable``d calls, and each layer compiles into the pieces between them (norm,
projections and RoPE before; output projection, residuals, norm and MLP after). The pieces are
compiled with dynamic shapes, so one compiled graph serves every step size; a decode bucket of 1
row gets its own (inductor specialises sizes of 1).

The cost is start-up time (compiling, then a warm-up forward of a prompt chunk so the first request
does not pay for it) and it is opt-in until measured: ``benchmarks/gpu_engine.py --compile``.
Decode graphs (engine/cuda_graphs.py) then capture the compiled kernels.
"""

from __future__ import annotations

import logging
import time

import torch

from . import paged

log = logging.getLogger("chatserve.engine")

_boundaries_set = False


def _set_boundaries() -> None:
    """Keep dynamo out of the paged KV write and attention (once per process)."""
    global _boundaries_set
    if _boundaries_set:
        return
    from transformers import AttentionInterface

    paged.PagedStep.update = torch.compiler.disable(paged.PagedStep.update)
    AttentionInterface.register(paged.NAME, torch.compiler.disable(paged.paged_attention))
    _boundaries_set = True


def compile_model(model, pool, cache_kw: str, device) -> bool:
    """Compile the text model's decoder layers (plus its rotary embedding and final norm) in place,
    then warm them up on a mixed step; False (and a warning) if the model has no such layers or
    compiling fails, and the model runs eagerly."""
    try:
        decoder = model.get_decoder()
    except Exception:  # noqa: BLE001 (models without a decoder accessor)
        decoder = None
    layers = getattr(decoder, "layers", None)
    if decoder is None or layers is None or len(layers) == 0:
        log.warning("--compile: no decoder layers found on %s; running eagerly", type(model).__name__)
        return False
    _set_boundaries()
    # one compiled graph for every layer (their layer_idx is a plain int attribute, which dynamo would
    # otherwise guard on: a recompile per layer), and no shape specialised because two sizes happen
    # to be equal in the first step that compiles (a step of 32 tokens and a model of 32 heads)
    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    torch.fx.experimental._config.use_duck_shape = False
    t0 = time.perf_counter()
    extras = (getattr(decoder, "rotary_emb", None), getattr(decoder, "norm", None))
    modules = [*layers, *(m for m in extras if m is not None)]
    for module in modules:
        module.compile(dynamic=True)
    try:
        with torch.inference_mode():
            _warm_up(model, pool, cache_kw, device)
    except Exception as exc:  # noqa: BLE001 (an architecture dynamo cannot trace: stay eager)
        for module in modules:
            module._compiled_call_impl = None
        log.warning("--compile failed (%s: %s); running eagerly", type(exc).__name__, exc)
        return False
    log.info(
        "torch.compile: %d decoder layers compiled and warmed up in %.1f s (attention and KV writes stay eager)",
        len(layers),
        time.perf_counter() - t0,
    )
    return True


def _warm_up(model, pool, cache_kw: str, device) -> None:
    """Steps of each kind the engine runs eagerly (mixed steps of two sizes; decode-only steps of 1
    and 2 rows, as when CUDA graphs are off), so the shapes are compiled before the first request.
    They write into the null block 0, which no sequence owns."""
    for rows, chunks in (
        ([([0], 1)], [([0], 0, 3)]),
        ([([0], 1)], [([0], 0, 2), ([0], 0, 3)]),
        ([([0], 1)], []),
        ([([0], 1), ([0], 2)], []),
    ):
        step = paged.PagedStep.build(pool, rows, chunks, device)
        positions = [length - 1 for _, length in rows] + [p for _, _, c in chunks for p in range(c)]
        paged.forward(model, cache_kw, [0] * len(positions), positions, step, [0], device)
