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

    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.kv_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()


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
    """How many blocks the pool gets, and a line saying why."""
    per_block = shape.bytes_per_token() * block_size
    need = max_running * -(-max_model_len // block_size) + 1  # every row at full context (+ the null block)
    if blocks is not None:
        return max(2, blocks), f"{blocks} blocks (set)"
    if gb is not None:
        budget, why = int(gb * 2**30), f"{gb:g} GiB (set)"
    elif str(device).startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
        fraction = 0.9 if memory_fraction is None else memory_fraction
        budget = int(free * fraction)
        why = f"{fraction:g} of the {free / 2**30:.1f} GiB free after loading the model"
    else:
        budget, why = int(DEFAULT_CPU_GB * 2**30), f"{DEFAULT_CPU_GB:g} GiB (default off CUDA)"
    n = max(2, budget // per_block)
    if n > need:
        return need, f"{need} blocks: enough for {max_running} rows at {max_model_len} tokens (budget {why})"
    return n, f"{n} blocks from {why}"


class KVPool:
    def __init__(self, shape: PoolShape, num_blocks: int, block_size: int, device):
        self.shape = shape
        self.block_size = block_size
        self.num_blocks = num_blocks
        slots = num_blocks * block_size
        # zeros: block 0 must be, and touching every page now keeps the process's memory flat later
        self.keys = [
            torch.zeros(slots, shape.kv_heads, shape.head_dim, dtype=shape.dtype, device=device)
            for _ in range(shape.num_layers)
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
