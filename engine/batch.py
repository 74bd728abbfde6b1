"""The running batch's KV cache: one left-padded DynamicCache shared by all decoding rows.

Rows join after their own (unpadded, possibly chunked) prefill and leave the step they finish.
Joining left-pads whichever side is shorter; leaving drops the row and trims columns that became
padding for every remaining row. Each decode step then runs one forward over all rows with a 2-D
attention mask that hides each row's padding, and per-row position ids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .scheduler import Sequence


def cache_length(cache: DynamicCache) -> int:
    return cache.layers[0].keys.shape[-2] if cache.layers and cache.layers[0].is_initialized else 0


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(t, (0, 0, n, 0)) if n else t  # [B, H, T, D]: pad T on the left


class DecodeBatch:
    def __init__(self, device: str, cache_kw: str = "cache"):
        self.device = device
        self.cache_kw = cache_kw
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, T] long: 1 real, 0 padding
        self.lengths: list[int] = []  # real tokens per row (= next position id)

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def join(self, cache: DynamicCache) -> int:
        """Append a row from a prefilled batch-1 cache; returns its row index."""
        n = cache_length(cache)
        if self.cache is None:
            self.cache = cache
            self.mask = torch.ones(1, n, dtype=torch.long, device=self.device)
            self.lengths = [n]
            return 0
        width = self.width
        grow = max(0, n - width)
        row_pad = max(0, width - n)
        for mine, new in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, grow), _pad_left(new.keys, row_pad)], dim=0)
            mine.values = torch.cat([_pad_left(mine.values, grow), _pad_left(new.values, row_pad)], dim=0)
        row_mask = torch.cat(
            [
                torch.zeros(1, row_pad, dtype=torch.long, device=self.device),
                torch.ones(1, n, dtype=torch.long, device=self.device),
            ],
            dim=1,
        )
        self.mask = torch.cat([F.pad(self.mask, (grow, 0)), row_mask], dim=0)
        self.lengths.append(n)
        return self.size - 1

    def remove(self, rows: list[int]) -> None:
        """Drop rows (indices into the current batch) and trim all-padding columns."""
        if not rows:
            return
        drop = set(rows)
        keep = [i for i in range(self.size) if i not in drop]
        if not keep:
            self.cache, self.mask, self.lengths = None, None, []
            return
        self.lengths = [self.lengths[i] for i in keep]
        trim = self.width - max(self.lengths)
        idx = torch.tensor(keep, device=self.device)
        for layer in self.cache.layers:  # trim first, so only the kept columns are copied
            layer.keys = layer.keys[:, :, trim:].index_select(0, idx)
            layer.values = layer.values[:, :, trim:].index_select(0, idx)
        self.mask = self.mask[:, trim:].index_select(0, idx)

    def prepare_decode(self) -> tuple[list[int], torch.Tensor | None]:
        """Open this step's column for every row: (each row's position id, [B, 1, 1, T] bool mask
        hiding padding, or None when no row has any)."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        positions = list(self.lengths)
        self.lengths = [n + 1 for n in self.lengths]
        if self.width == min(self.lengths):
            return positions, None
        return positions, self.mask.bool()[:, None, None, :]

    def decode_inputs(self, last_tokens: list[int]) -> dict:
        """Model kwargs for one (unpacked) decode step of every row."""
        ids = torch.tensor(last_tokens, dtype=torch.long, device=self.device).unsqueeze(1)
        positions, _ = self.prepare_decode()
        width = self.width
        kwargs = {
            "input_ids": ids,
            self.cache_kw: self.cache,
            "use_cache": True,
            "position_ids": torch.tensor(positions, dtype=torch.long, device=self.device).unsqueeze(1),
            "cache_position": torch.tensor([width - 1], device=self.device),
        }
        # A batch without padding needs no mask (the fast path generate() takes at batch 1).
        kwargs["attention_mask"] = None if width == min(self.lengths) else self.mask
        return kwargs


class FallbackSteps:
    """Part of Engine (engine.py): the step for models the paged forward does not fit."""

    def _run_unpacked(self, work: list[tuple[Sequence, int]], out) -> None:
        """Fallback for models packed steps do not fit: a batch-1 forward per prefill chunk, then
        one decode forward over the running rows."""
        sched = self.scheduler
        for seq, n in work:
            logits = self._prefill(seq, n)
            if seq.num_prefilled < seq.num_tokens:
                continue
            self._start_decoding(seq)
            self._sample_and_postprocess(logits, [seq], out)
            self._deliver(out)  # its first token goes out now, not after the rest of the step
            out.clear()
        finished = [i for i, s in enumerate(sched.running) if s.finished]
        if finished:
            sched.remove_rows(finished)
            self.batch.remove(finished)
        if sched.running:
            kwargs = self.batch.decode_inputs([s.output_ids[-1] for s in sched.running])
            logits = self.model(**kwargs, logits_to_keep=1).logits[:, -1, :].float()
            self.stats["decode_steps"] += 1
            self.stats["decode_rows"] += len(sched.running)
            self._sample_and_postprocess(logits, list(sched.running), out)

    def _prefill(self, seq: Sequence, n: int) -> torch.Tensor:
        start = seq.num_prefilled
        ids = torch.tensor([seq.token_ids[start : start + n]], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + n, device=self.device)
        out = self.model(
            input_ids=ids,
            position_ids=positions.unsqueeze(0),
            cache_position=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: seq.prefill_cache},
        )
        seq.num_prefilled += n
        self.stats["prefill_tokens"] += n
        return out.logits[:, -1, :].float()
