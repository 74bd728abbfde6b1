"""KV memory in the engine: the pool sized at start-up and the CUDA graphs captured over it; which
prompts get blocks (admission with a small watermark), the slot for every running row's next
token, preemption of the newest holder when the pool is full, and full blocks offered to the
prefix cache."""

from __future__ import annotations

import logging
import time

import torch
from transformers import DynamicCache

from .block_manager import BlockManager
from .cuda_graphs import DecodeGraphs
from .kv_cache import KVPool, PoolShape, plan_num_blocks
from .loader import placement
from .scheduler import Sequence

log = logging.getLogger("chatserve.engine")


class KVAdmission:
    """Part of Engine (engine.py): the pool, its blocks and the decode graphs."""

    def _make_pool(self) -> None:
        cfg, bs = self.config, self.config.block_size
        shape = PoolShape.of(self.model)
        devices = self.loaded.layer_devices or self.device  # per layer when spread over several devices
        n, why = plan_num_blocks(
            shape,
            devices,
            bs,
            max_running=cfg.max_running,
            max_model_len=self.max_model_len,
            memory_fraction=cfg.kv_cache_memory_fraction,
            gb=cfg.kv_cache_gb,
            blocks=cfg.kv_cache_blocks,
        )
        self.pool = KVPool(shape, n, bs, devices)
        if len(set(self.pool.devices)) > 1:
            log.info("KV pool placement (each layer's KV on its device): %s", placement(self.pool.devices))
        self.blocks = BlockManager(n, bs, prefix_caching=cfg.prefix_cache)
        if self.blocks.capacity_tokens < self.max_model_len:
            log.warning(
                "the KV pool holds %d tokens: context length capped from %d",
                self.blocks.capacity_tokens,
                self.max_model_len,
            )
            self.max_model_len = self.blocks.capacity_tokens
        # admission keeps a few blocks free for running rows, so a newcomer rarely forces a preemption
        self._watermark = max(1, (n - 1) // 100)
        log.info(
            "KV pool: %d blocks of %d tokens (%.1f MiB, %d tokens; %s); prefix cache %s",
            n - 1,
            bs,
            self.pool.nbytes / 2**20,
            self.blocks.capacity_tokens,
            why,
            "on" if cfg.prefix_cache else "off",
        )

    def _make_graphs(self) -> None:
        mode = "off" if self.config.enforce_eager else self.config.decode_graphs
        cuda = torch.device(self.device).type == "cuda"
        if mode == "off" or (mode == "auto" and not cuda):
            if cuda:
                log.info("CUDA graphs off (--enforce-eager): every step runs eagerly")
            return
        if self.mrope:
            log.info("CUDA graphs off: multimodal rotary positions (Qwen2-VL) are not captured")
            return
        spread = sorted(set(map(str, self.loaded.layer_devices or [])))
        if len(spread) > 1:
            log.info("CUDA graphs off: the model spans %d devices (%s; device_map)", len(spread), ", ".join(spread))
            return
        graphs = DecodeGraphs(
            self.model,
            self._cache_kw,
            self.pool,
            self.config.max_running,
            self.max_model_len,
            self.device,
            emulate=mode == "emulate",
        )
        try:
            with torch.inference_mode():
                graphs.capture()
        except Exception as exc:  # an architecture the capture does not fit: eager steps still work
            log.warning("CUDA graph capture failed (%s: %s); decode steps run eagerly", type(exc).__name__, exc)
            return
        self.graphs = graphs

    def _begin(self, seq: Sequence) -> bool:
        """Give a sequence about to be prefilled its KV; False when there is no room for it yet."""
        if not self.packed:
            # full-length layers for every layer (no config): a sliding-window layer's cache keeps only
            # the window and a KV-shared layer's none, and the decode batch pads and joins every
            # layer to one length (engine/batch.py); the model's own masks still apply its windows
            seq.prefill_cache = DynamicCache()
        else:
            need = self.blocks.blocks_for(seq.num_tokens)
            busy = self.scheduler.running or any(s.started for s in self.scheduler.waiting)
            if need + (self._watermark if busy else 0) > self.blocks.num_free:
                return False
            if seq.request.multimodal is not None and seq.image_embeds is None:
                try:
                    self._encode_images(seq)
                except Exception as exc:  # this request's images: it alone fails
                    log.exception("%s: the vision encoder failed", seq.request.request_id)
                    self.scheduler.waiting.remove(seq)
                    self._finish(
                        seq, "error", self._step_out, error=f"image encoding failed: {type(exc).__name__}: {exc}"
                    )
                    return False
            wants_prompt_lps = seq.request.params.prompt_logprobs is not None
            if wants_prompt_lps and seq.prompt_lps is None:
                seq.prompt_lps = [None]  # the first prompt token: nothing predicts it
            seq.block_table, cached = self.blocks.allocate(seq.token_ids, seq.mm_key, reuse=not wants_prompt_lps)
            seq.num_prefilled = cached
            if not seq.preemptions:
                seq.cached_tokens = cached
            self.stats["prefix_cache_hit_tokens"] += cached
        seq.started = True
        seq.start_order = next(self._start_order)
        if seq.started_at is None:
            seq.started_at = time.monotonic()
        return True

    def _release(self, seq: Sequence) -> None:
        """Drop a sequence's KV (its blocks go back to the pool, full ones stay reusable)."""
        if seq.block_table:
            self.blocks.free_table(seq.block_table)
        seq.prefill_cache = None
        seq.started = False
        seq.num_prefilled = seq.num_registered = 0
        seq.prev_hash = None

    def _preempt(self, seq: Sequence) -> None:
        log.info(
            "KV pool full: preempting %s after %d tokens (recomputed when blocks free up)",
            seq.request.request_id,
            len(seq.output_ids),
        )
        self._release(seq)
        seq.preemptions += 1
        self.stats["preemptions"] += 1
        if seq in self.scheduler.running:
            self.scheduler.preempt(seq)

    def _reserve_decode_slots(self) -> None:
        """A slot for every running row's next token; the newest sequence holding KV is preempted
        (possibly the row itself) while the pool has none."""
        for seq in list(self.scheduler.running):  # oldest first
            if not seq.started:
                continue  # preempted for an older row just now
            while not self.blocks.append_slot(seq.block_table, seq.num_tokens - 1):
                holders = self.scheduler.running + [s for s in self.scheduler.waiting if s.started]
                victim = max(holders, key=lambda s: s.start_order)
                self._preempt(victim)
                if victim is seq:
                    break

    def _register(self, seq: Sequence, num_computed: int) -> None:
        seq.num_registered, seq.prev_hash = self.blocks.register(
            seq.token_ids, seq.block_table, num_computed, seq.num_registered, seq.prev_hash, seq.mm_key
        )
