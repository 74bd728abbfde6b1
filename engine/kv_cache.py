"""The KV pool: every layer's keys and values for every sequence, preallocated once at start-up.

Per layer one key tensor and one value tensor of ``[num_blocks * block_size, kv_heads, head_dim]``
token slots. Which slots belong to which sequence is engine/block_manager.py's business; a step
writes its new keys and values with one scatter per layer (``index_copy_`` at the step's slot
mapping) and attention reads them back through the sequences' block tables (engine/paged.py).
Nothing is ever concatenated or copied as a whole.

The pool is sized from memory: on CUDA a fraction of the memory left free after the model loaded
(``--kv-cache-memory-fraction``), elsewhere (or with ``--kv-cache-gb``) a size in GiB; never more
than ``max_running`` sequences of the full context need. Block 0 stays zero and is never handed
out: gathers pad with it.

A model spread over several GPUs (``device_map``, engine/loader.py) keeps each layer's keys and
values on that layer's device. Every device holds the same blocks for its own layers, so the block
count is the smallest any device affords: on CUDA each device's budget is the fraction of its own
free memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("chatserve.engine")

DEFAULT_CPU_GB = 1.0


@dataclass
class PoolShape:
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, model) -> PoolShape:
        cfg = model.config
        cfg = getattr(cfg, "get_text_config", lambda: cfg)()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, kv_heads, head_dim, next(model.parameters()).dtype)

    def bytes_per_token(self, num_layers: int | None = None) -> int:
        layers = self.num_layers if num_layers is None else num_layers
        return layers * 2 * self.kv_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()


def per_layer(device, num_layers: int) -> list[torch.device]:
    """One device, or a list of one per layer, as a list of one per layer."""
    if isinstance(device, (list, tuple)):
        if len(device) != num_layers:
            raise ValueError(f"{len(device)} layer devices for {num_layers} layers")
        return [torch.device(d) for d in device]
    return [torch.device(device)] * num_layers


def plan_num_blocks(
    shape: PoolShape,
    device,
    block_size: int,
    *,
    max_running: int,
    max_model_len: int,
    memory_fraction: float | None = None,
    gb: float | None = None,
    blocks: int | None = None,
) -> tuple[int, str]:
    """How many blocks the pool gets, and a line saying why. ``device``: one device, or one per
    layer (a model spread over several devices: each device's budget holds its own layers' blocks,
    and the pool gets the fewest blocks any device affords)."""
    need = max_running * -(-max_model_len // block_size) + 1  # every row at full context (+ the null block)
    if blocks is not None:
        return max(2, blocks), f"{blocks} blocks (set)"
    layers = per_layer(device, shape.num_layers)
    if gb is not None:  # the whole pool's size, over every device
        n, why = int(gb * 2**30) // (shape.bytes_per_token() * block_size), f"{gb:g} GiB (set)"
    else:
        counts: dict[torch.device, int] = {}
        for d in layers:
            counts[d] = counts.get(d, 0) + 1
        fraction = 0.9 if memory_fraction is None else memory_fraction
        n, why = None, ""
        for d, num in counts.items():
            if d.type == "cuda":
                free, _total = torch.cuda.mem_get_info(d)
                budget = int(free * fraction)
                said = f"{fraction:g} of the {free / 2**30:.1f} GiB free after loading the model"
            else:
                budget, said = int(DEFAULT_CPU_GB * 2**30), f"{DEFAULT_CPU_GB:g} GiB (default off CUDA)"
            fits = budget // (shape.bytes_per_token(num) * block_size)
            if n is None or fits < n:
                n, why = fits, said + (f" on {d} ({num} of {shape.num_layers} layers)" if len(counts) > 1 else "")
    n = max(2, n)
    if n > need:
        return need, f"{need} blocks: enough for {max_running} rows at {max_model_len} tokens (budget {why})"
    return n, f"{n} blocks from {why}"


class KVPool:
    def __init__(self, shape: PoolShape, num_blocks: int, block_size: int, device):
        """``device``: one device for every layer, or a list of one per layer."""
        self.shape = shape
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.devices = per_layer(device, shape.num_layers)
        slots = num_blocks * block_size
        # zeros: block 0 must be, and touching every page now keeps the process's memory flat later
        self.keys = [
            torch.zeros(slots, shape.kv_heads, shape.head_dim, dtype=shape.dtype, device=d) for d in self.devices
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k in self.keys)

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Scatter new keys/values ``[N, kv_heads, head_dim]`` into their slots ``[N]``."""
        self.keys[layer].index_copy_(0, slots, keys)
        self.values[layer].index_copy_(0, slots, values)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at ``slots`` (any shape S) -> ``[*S, kv_heads, head_dim]`` each."""
        return self.keys[layer][slots], self.values[layer][slots]
