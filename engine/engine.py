"""The engine: a step loop over a continuously batched set of sequences.

step() = schedule (aborts, queue timeouts, a KV slot for every running row's next token, preempting
the newest sequence when the pool is full, which prompts start and how many of their tokens)
-> run (one packed forward over the KV pool: every running row's next token plus this step's prompt
chunks, engine/paged.py; on CUDA a decode-only step replays a captured graph, engine/cuda_graphs.py)
-> postprocess (per-row sampling, detokenization, stop checks, events to
each request's own stream; finished sequences free their blocks).

KV lives in one pool (engine/kv_cache.py) whose blocks engine/block_manager.py hands out; a
sequence holds block ids, never tensors. Models the paged forward does not fit (its self-test
fails, or they have non-attention layers) take the fallback path: a batch-1 forward per prompt
chunk into the sequence's own DynamicCache, then one decode forward over a left-padded batch cache
(engine/batch.py); no prefix cache and no preemption there.

The loop runs on its own thread; ``generate()`` is the async public API: submit a request, get an
async stream of TokenEvents (an EventStream, engine/stream.py).

This file holds the lifecycle, the loop and a step's assembly; the Engine's other jobs are mixed
in from their own files: KV admission, preemption and graph capture (admission.py), images and
M-RoPE (multimodal.py), sampling and per-row events (output.py), prompts and constraints for the
server (prompt_api.py), and the fallback path's step (batch.py).
"""

from __future__ import annotations

import bisect
import dataclasses
import inspect
import itertools
import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

import torch

from . import compiled, paged
from .admission import KVAdmission
from .batch import DecodeBatch, FallbackSteps
from .block_manager import BlockManager
from .cuda_graphs import DecodeGraphs
from .detokenize import TokenTexts
from .kv_cache import KVPool
from .loader import LoadedModel
from .multimodal import MultimodalMixin, attends_both_ways_within_images
from .output import OutputMixin
from .prompt import PromptRenderer
from .prompt_api import PromptAPI
from .request import GenerationRequest, TokenEvent
from .scheduler import EngineOverloaded, Scheduler, Sequence
from .stream import EventStream, deliver

log = logging.getLogger("chatserve.engine")


@dataclass
class EngineConfig:
    max_running: int = 32  # rows decoded together
    max_waiting: int = 256  # requests queued beyond the running ones; more get 429
    queue_timeout: float | None = 300.0  # seconds a request may wait to start
    prefill_chunk: int | None = None  # prompt tokens prefilled per step (default 512; on CUDA 2048)
    max_newcomers: int | None = None  # prompts started per step while rows decode (default 1; CUDA: no cap)
    packed: bool = True  # one forward per step over the KV pool (engine/paged.py); False: fallback
    prefix_cache: bool = True  # full KV blocks reused by prompts that start the same way
    block_size: int = 16  # tokens per KV block
    kv_cache_memory_fraction: float | None = None  # CUDA: share of free memory for the pool (default 0.9)
    kv_cache_gb: float | None = None  # the pool's size in GiB (default off CUDA: 1)
    kv_cache_blocks: int | None = None  # the pool's size in blocks (tests)
    prefix_cache_mb: int | None = None  # older spelling kept for scripts: 0 = prefix_cache off
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    decode_graphs: str = "auto"  # auto: CUDA graphs on CUDA; off; emulate: static buffers, no capture (tests)
    compile: bool = False  # torch.compile the decoder layers, attention left out (engine/compiled.py)

    def __post_init__(self):
        if self.prefix_cache_mb == 0:
            self.prefix_cache = False


class Engine(PromptAPI, KVAdmission, MultimodalMixin, OutputMixin, FallbackSteps):
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = dataclasses.replace(config) if config else EngineConfig()  # (defaults filled in below)
        self.device = loaded.device
        self.max_model_len = loaded.max_model_len
        self.model_name = loaded.name
        self.prompts = PromptRenderer(self.tokenizer, loaded.processor)
        self.texts = TokenTexts(self.tokenizer)
        self.eos_ids = self._eos_ids()
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        cuda = torch.device(self.device).type == "cuda"
        if self.config.prefill_chunk is None:  # a GPU step of a few thousand prompt tokens costs little more
            # than a launch-bound decode step; a CPU's grows with every token
            self.config.prefill_chunk = 2048 if cuda else 512
        if self.config.max_newcomers is None:
            # On CUDA every step with a prompt chunk runs eagerly (only decode-only steps replay a
            # graph) and costs the same launches whatever its prompt tokens, so it starts as many
            # prompts as the chunk budget holds; on CPU a step's cost grows with its tokens.
            self.config.max_newcomers = self.config.max_running if cuda else 1
        self.scheduler = Scheduler(
            self.config.max_running, self.config.queue_timeout, self.config.prefill_chunk, self.config.max_newcomers
        )
        # transformers renamed forward(past_key_values=) to forward(cache=) during 5.x
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.batch = DecodeBatch(self.device, self._cache_kw)
        if str(self.device).startswith("cuda") and torch.backends.cuda.cudnn_sdp_enabled():
            # torch sends masked SDPA to cuDNN first, and cuDNN builds an execution plan for every new
            # shape (hundreds of ms); a decode batch's cache width changes every step. Flash and
            # memory-efficient attention need no plans.
            torch.backends.cuda.enable_cudnn_sdp(False)
            log.info("cuDNN SDPA backend off (it plans per shape; decode shapes change every step)")
        self.packed = self.config.packed and paged.install(
            self.model, self._cache_kw, self.device, loaded.layer_devices
        )
        self.image_token_id = self._image_token_id()
        self.images_attend_both_ways = self.image_token_id is not None and attends_both_ways_within_images(self.model)
        if self.images_attend_both_ways:
            log.info("image tokens attend to each other both ways (the model's masks): prompt chunks keep images whole")
        # multimodal rotary positions (Qwen2-VL family): three position axes per token, from the model
        inner = getattr(self.model, "model", None)
        self.mrope = inner is not None and hasattr(inner, "get_rope_index")
        self.pool: KVPool | None = None
        self.blocks: BlockManager | None = None
        self.graphs: DecodeGraphs | None = None
        if self.packed:
            self._make_pool()
            if self.config.compile:
                compiled.compile_model(self.model, self.pool, self._cache_kw, self.device)
            self._make_graphs()
        log.info(
            "engine steps: %s",
            "one packed forward over the KV pool (prefill chunks join the decode forward)"
            if self.packed
            else "fallback: separate batch-1 prefill forwards, then one decode forward",
        )
        self._start_order = itertools.count()
        self._cv = threading.Condition()
        self._inbox: list[Sequence] = []
        self._in_system = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._crashed: BaseException | None = None
        self._constraints = None
        self._step_out: list = []
        self.stats = defaultdict(int)

    # ------------------------------------------------------------------ lifecycle
    def _eos_ids(self) -> list[int]:
        ids = set()
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        for e in eos if isinstance(eos, (list, tuple)) else [eos]:
            if e is not None:
                ids.add(int(e))
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return sorted(ids)

    @property
    def scores_prompts(self) -> bool:
        """Prompt logprobs and max_tokens=0 (scoring without generating): the paged path only."""
        return self.packed

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="chatserve-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._thread is None or not self._thread.is_alive():
            self.pool = None  # give the pool's memory back (another engine may be built next)
            if str(self.device).startswith("cuda"):
                torch.cuda.empty_cache()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._crashed is None

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting + len(self._inbox)

    # ------------------------------------------------------------------ public API
    def generate(self, request: GenerationRequest) -> EventStream:
        """Async stream of TokenEvents for one request; the last one has finish_reason set.

        The request is submitted when the stream is first awaited, and raises EngineOverloaded
        there when the queue is full. Closing the stream early (client gone, task cancelled)
        aborts the request; its row leaves the batch at the next step.
        """
        return EventStream(self, request)

    def _submit(self, request: GenerationRequest, sink) -> Sequence:
        if not self.alive:
            raise RuntimeError("engine is not running")
        params = request.params
        max_tokens = (
            params.max_tokens if params.max_tokens is not None else self.max_model_len - len(request.prompt_ids)
        )
        seq = Sequence(request=request, sink=sink, max_tokens=max(0, max_tokens))
        with self._cv:
            limit = self.config.max_running + self.config.max_waiting
            if self._in_system >= limit:
                self.stats["rejected"] += 1
                raise EngineOverloaded(
                    f"server is at capacity ({self.config.max_running} running, "
                    f"{self.config.max_waiting} waiting); retry later",
                    retry_after=self._retry_after(),
                )
            self._in_system += 1
            self._inbox.append(seq)
            self._cv.notify()
        return seq

    def _retry_after(self) -> int:
        return 1 if self.scheduler.num_running == 0 else 2

    def abort(self, seq: Sequence) -> None:
        with self._cv:
            seq.aborted = True
            self._cv.notify()

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        log.info(
            "engine loop started (max_running=%d, max_waiting=%d, prefill_chunk=%d)",
            self.config.max_running,
            self.config.max_waiting,
            self.config.prefill_chunk,
        )
        while True:
            with self._cv:
                while not (self._stopping or self._inbox or self.scheduler.waiting or self.scheduler.running):
                    self._cv.wait()
                if self._stopping:
                    break
                for seq in self._inbox:
                    self.scheduler.admit(seq)
                self._inbox.clear()
            try:
                t = time.perf_counter()
                with torch.inference_mode():
                    self.step()
                self.stats["time_step_s"] += time.perf_counter() - t
            except Exception as exc:  # a bug or a device fault: fail the batch, keep serving
                log.exception(
                    "engine step failed; failing %d running and prefilling requests", self.scheduler.num_running
                )
                self._fail_all(f"internal error: {type(exc).__name__}: {exc}")
        self._fail_all("server is shutting down", waiting_too=True)

    def _fail_all(self, message: str, waiting_too: bool = False) -> None:
        out: list[tuple[Sequence, TokenEvent]] = []
        victims = list(self.scheduler.running)
        victims += [s for s in self.scheduler.waiting if waiting_too or s.started]
        for seq in victims:
            self._finish(seq, "error", out, error=message)
        self.scheduler.running = []
        self.scheduler.waiting = deque(s for s in self.scheduler.waiting if not s.finished)
        self.batch = DecodeBatch(self.device, self._cache_kw)
        self._deliver(out)

    def step(self) -> None:
        out: list[tuple[Sequence, TokenEvent]] = []
        self._step_out = out  # for events made deep inside scheduling (a request failing as it starts)
        sched = self.scheduler
        # -- schedule: aborts, queue timeouts
        gone_waiting, gone_rows = sched.take_aborted()
        for seq in gone_waiting:
            self._finish(seq, "abort", out)
        if gone_rows:
            for seq in sched.remove_rows(gone_rows):
                self._finish(seq, "abort", out)
            if not self.packed:
                self.batch.remove(gone_rows)
        for seq in sched.timed_out(time.monotonic()):
            self._finish(seq, "error", out, error="queue_timeout")
        if self.packed:
            self._run_paged(out)
        else:
            self._run_unpacked(sched.prefill_work(self._begin), out)
        finished = [i for i, s in enumerate(sched.running) if s.finished]
        if finished:
            sched.remove_rows(finished)
            if not self.packed:
                self.batch.remove(finished)
        if self.blocks is not None:
            self.stats.update(self.blocks.stats())
        self._deliver(out)

    def _run_paged(self, out) -> None:
        """One forward over the pool: the next token of every running row, then this step's prompt chunks."""
        sched = self.scheduler
        self._reserve_decode_slots()
        work = sched.prefill_work(self._begin)
        rows = list(sched.running)
        tokens = [s.token_ids[-1] for s in rows]
        positions = [s.num_tokens - 1 for s in rows]
        position_parts = [[p + s.mrope_delta for s, p in zip(rows, positions)]] if self.mrope else None
        row_layout = [(s.block_table, s.num_tokens) for s in rows]
        chunks, keep, completing = [], list(range(len(rows))), []
        image_at, image_rows = [], []  # packed indices of image tokens, and their embeddings
        scoring, score_at = [], []  # (seq, first position, count) of prompt positions whose logprobs are wanted
        scored_only = []  # prompts to score without generating (max_tokens 0)
        for seq, n in work:
            start = seq.num_prefilled
            if seq.prompt_lps is not None and start < seq.prompt_len - 1:
                first = max(start, len(seq.prompt_lps) - 1)  # (a recomputed prompt is not scored twice)
                count = min(start + n, seq.prompt_len - 1) - first
                if count > 0:
                    scoring.append((seq, first, count))
                    score_at += range(len(tokens) + first - start, len(tokens) + first - start + count)
            if seq.image_positions:
                lo = bisect.bisect_left(seq.image_positions, start)
                hi = bisect.bisect_left(seq.image_positions, start + n)
                if hi > lo:
                    image_at += [len(tokens) + p - start for p in seq.image_positions[lo:hi]]
                    image_rows.append(seq.image_embeds[lo:hi])
            tokens += seq.token_ids[start : start + n]
            positions += range(start, start + n)
            if self.mrope:
                position_parts.append(self._mrope_positions(seq, start, n))
            runs = [(a, b) for a, b in seq.image_runs if a < start + n and b > start]
            chunks.append((seq.block_table, start, n, runs))
            seq.num_prefilled += n
            self.stats["prefill_tokens"] += n
            if seq.num_prefilled >= seq.num_tokens:
                if seq.max_tokens == 0:
                    scored_only.append(seq)
                else:
                    completing.append(seq)
                    keep.append(len(tokens) - 1)
        if not tokens:
            return
        t0 = time.perf_counter()
        if not chunks and self.graphs is not None and self.graphs.fits(row_layout):
            logits = self.graphs.run(tokens, row_layout)  # a decode-only step: one graph replay
            self.stats["graph_steps"] += 1
        else:
            step = paged.PagedStep.build(self.pool, row_layout, chunks, self.device)
            images = (image_at, torch.cat(image_rows) if len(image_rows) > 1 else image_rows[0]) if image_rows else None
            if self.mrope:  # [3, N]: temporal, height, width
                positions = torch.cat(
                    [
                        torch.tensor(p, dtype=torch.long, device=self.device).expand(3, -1)
                        if isinstance(p, list)
                        else p
                        for p in position_parts
                    ],
                    dim=1,
                )
            logits = paged.forward(
                self.model, self._cache_kw, tokens, positions, step, keep + score_at, self.device, images
            )
        if scoring:
            self._score_prompts(logits[len(keep) :], scoring)
            logits = logits[: len(keep)]
        t1 = time.perf_counter()
        self.stats["time_forward_s"] += t1 - t0
        for seq in rows:  # full blocks whose KV is now written become reusable
            self._register(seq, seq.num_tokens)
        for seq, _ in work:
            self._register(seq, seq.num_prefilled)
        for seq in scored_only:  # scored, nothing to generate
            self.scheduler.waiting.remove(seq)
            self._finish(seq, "length", out)
        for seq in completing:  # newcomers join after the rows that decoded this step
            self._start_decoding(seq)
        if rows:
            self.stats["decode_steps"] += 1
            self.stats["decode_rows"] += len(rows)
        t2 = time.perf_counter()
        self._sample_and_postprocess(logits, rows + completing, out)
        self.stats["time_join_s"] += t2 - t1

    _deliver = staticmethod(deliver)


__all__ = ["Engine", "EngineConfig", "EngineOverloaded"]
