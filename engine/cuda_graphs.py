"""CUDA graphs for decode steps: the model's whole forward for B decoding rows, replayed as one launch.

A decode step of an 8B model is thousands of small kernels; launched one by one from Python the GPU
waits on the CPU. At start-up ``DecodeGraphs.capture()`` records the forward once per batch-size
bucket (1, 2, 4, 8, then steps of 8 up to the maximum, as vLLM and SGLang do) over static input
buffers: token ids, positions, the slot each new token's KV goes to, context lengths and block
tables. A step with B rows (and no prompt chunks) fills the buffers, pads to the next bucket and
replays the bucket's graph. Padding rows decode token 0 at position 0 with a context of one token,
writing into the pool's null block 0, which no sequence owns; their logits are dropped.

Attention inside the graph is the Triton paged kernel (engine/triton_attention.py), whose launch
shape depends on the bucket only, so one graph serves every context length up to the model's.

``emulate=True`` runs the same static-buffer forward without capturing (off CUDA): tests exercise
the buffers, padding and bucket logic on CPU.
"""

from __future__ import annotations

import logging
import time

import torch

from . import paged
from .kv_cache import KVPool

log = logging.getLogger("chatserve.engine")


def buckets_up_to(max_batch: int) -> list[int]:
    out = [b for b in (1, 2, 4, 8) if b < max_batch]
    out += list(range(16, max_batch, 8))
    return out + [max_batch]


def bucket_for(rows: int, buckets: list[int] | None = None) -> int:
    """The bucket a step of ``rows`` rows pads to (1, 2, 4, 8, 16, 24, ...; past the last, rounded up to 8)."""
    for b in buckets or (1, 2, 4, 8):
        if b >= rows:
            return b
    return -(-rows // 8) * 8


class DecodeGraphs:
    def __init__(
        self, model, cache_kw: str, pool: KVPool, max_batch: int, max_model_len: int, device, emulate: bool = False
    ):
        self.model, self.cache_kw, self.pool, self.device = model, cache_kw, pool, device
        self.emulate = emulate
        self.buckets = buckets_up_to(max_batch)
        self.max_batch = self.buckets[-1]
        width = -(-max_model_len // pool.block_size) + 1
        b = self.max_batch
        with torch.inference_mode():  # like every step's own tensors (torch.compile guards on it)
            # rows: token ids, positions, KV slots, context lengths (padding rows: token 0 at 0, length 1)
            self.meta = torch.zeros(4, b, dtype=torch.long, device=device)
            self.meta[3] = 1
            self.tables = torch.zeros(b, width, dtype=torch.int32, device=device)
            self.mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.steps = {n: self._step(n) for n in self.buckets}
        self.replays = 0

    def _step(self, n: int) -> paged.PagedStep:
        kernel = paged.use_kernel(self.device)
        step = paged.PagedStep(
            self.pool,
            self.meta[2, :n],
            n,
            None,
            self.meta[3, :n],
            [],
            self.tables[:n] if kernel else None,
            paged.decode_splits(n, self.pool.shape.kv_heads, self.device) if kernel else 0,
        )
        step.max_len = self.tables.shape[1] * self.pool.block_size
        return step

    def _forward(self, n: int) -> torch.Tensor:
        step = self.steps[n]
        if step.tables is None:  # (emulation off CUDA) the gather path needs this step's slots
            bs = self.pool.block_size
            lengths = self.meta[3, :n]
            width = int(lengths.max())
            pos = torch.arange(width, device=self.device)
            table = self.tables[:n, : -(-width // bs)].long()
            step.row_slots = (table[:, pos // bs] * bs + pos % bs).masked_fill(pos[None, :] >= lengths[:, None], 0)
            step.min_len, step.max_len = int(lengths.min()), width
            step._masks = {}
        out = self.model(
            # [1, n] views with a step's own strides (torch.compile guards on strides)
            input_ids=self.meta[0, :n].unsqueeze(0),
            position_ids=self.meta[1, :n].unsqueeze(0),
            attention_mask=self.mask,
            use_cache=True,
            logits_to_keep=0,
            **{self.cache_kw: step},
        )
        return out.logits[0]

    def capture(self) -> None:
        """Record one graph per bucket, largest first (the smaller ones reuse its memory)."""
        if self.emulate:  # no capture; the warm-up alone (compiles a --compile model's bucket shapes)
            for n in reversed(self.buckets):
                self._forward(n)
            return
        t0 = time.perf_counter()
        mempool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device=self.device)
        for n in reversed(self.buckets):
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up: Triton compiles, cuBLAS picks its kernels
                self._forward(n)
                self._forward(n)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool, stream=stream, capture_error_mode="thread_local"):
                self.outputs[n] = self._forward(n)
            self.graphs[n] = graph
        torch.cuda.synchronize(self.device)
        log.info(
            "CUDA graphs captured for decode batch sizes %s in %.1f s (--enforce-eager turns them off)",
            self.buckets,
            time.perf_counter() - t0,
        )

    def fits(self, rows: list[tuple[list[int], int]]) -> bool:
        return 0 < len(rows) <= self.max_batch and max(len(t) for t, _ in rows) <= self.tables.shape[1]

    def run(self, tokens: list[int], rows: list[tuple[list[int], int]]) -> torch.Tensor:
        """Logits ``[B, V]`` (float32) for B decoding rows: (block table, context length incl. this token)."""
        B = len(tokens)
        n = bucket_for(B, self.buckets)
        pad = n - B
        lengths = [length for _, length in rows]
        values = (
            tokens
            + [0] * pad
            + [length - 1 for length in lengths]
            + [0] * pad
            + paged.row_slot_mapping(rows, self.pool.block_size)
            + [0] * pad
            + lengths
            + [1] * pad
        )
        self.meta[:, :n].copy_(torch.tensor(values, dtype=torch.long).view(4, n), non_blocking=True)
        width = max(len(t) for t, _ in rows)
        self.tables[:B, :width].copy_(
            torch.tensor([t + [0] * (width - len(t)) for t, _ in rows], dtype=torch.int32), non_blocking=True
        )
        if self.emulate:
            logits = self._forward(n)
        else:
            self.graphs[n].replay()
            logits = self.outputs[n]
        self.replays += 1
        return logits[:B].float()
