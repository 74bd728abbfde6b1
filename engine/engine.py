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
async stream of TokenEvents (an EventStream).
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import hashlib
import inspect
import itertools
import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from . import paged
from .batch import DecodeBatch
from .block_manager import BlockManager
from .cuda_graphs import DecodeGraphs
from .detokenize import IncrementalDetokenizer, StopStringMatcher, TokenTexts
from .kv_cache import KVPool, PoolShape, plan_num_blocks
from .loader import LoadedModel
from .prompt import PromptError, PromptRenderer
from .request import GenerationRequest, MultimodalInputs, TokenEvent
from .sampling import RowState, logprob_entries, sample_batch
from .scheduler import EngineOverloaded, Scheduler, Sequence

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

    def __post_init__(self):
        if self.prefix_cache_mb == 0:
            self.prefix_cache = False


class Engine:
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
        self.packed = self.config.packed and paged.install(self.model, self._cache_kw, self.device)
        self.image_token_id = self._image_token_id()
        # multimodal rotary positions (Qwen2-VL family): three position axes per token, from the model
        inner = getattr(self.model, "model", None)
        self.mrope = inner is not None and hasattr(inner, "get_rope_index")
        self.pool: KVPool | None = None
        self.blocks: BlockManager | None = None
        self.graphs: DecodeGraphs | None = None
        if self.packed:
            self._make_pool()
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

    def _image_token_id(self) -> int | None:
        """The placeholder token the processor expands per image, if images can be served.

        Images ride in paged steps only (their embeddings replace the placeholders' in the packed
        input).
        """
        if self.loaded.processor is None:
            return None
        cfg = self.model.config
        token = getattr(cfg, "image_token_id", None)
        if token is None:
            token = getattr(cfg, "image_token_index", None)
        why = None
        if token is None:
            why = "the model's config names no image token"
        elif not self.packed:
            why = "images need the paged engine path, which this model does not take"
        elif not hasattr(self.model, "get_image_features"):
            why = "the model has no get_image_features"
        if why is not None:
            log.warning("this vision-language model serves text only: %s", why)
            return None
        return int(token)

    @property
    def accepts_images(self) -> bool:
        return self.image_token_id is not None

    @property
    def scores_prompts(self) -> bool:
        """Prompt logprobs and max_tokens=0 (scoring without generating): the paged path only."""
        return self.packed

    def _make_pool(self) -> None:
        cfg, bs = self.config, self.config.block_size
        shape = PoolShape.of(self.model)
        n, why = plan_num_blocks(
            shape,
            self.device,
            bs,
            max_running=cfg.max_running,
            max_model_len=self.max_model_len,
            memory_fraction=cfg.kv_cache_memory_fraction,
            gb=cfg.kv_cache_gb,
            blocks=cfg.kv_cache_blocks,
        )
        self.pool = KVPool(shape, n, bs, self.device)
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
            seq.prefill_cache = DynamicCache(config=self.model.config)
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

    def _encode_images(self, seq: Sequence) -> None:
        """Run the vision encoder over a newcomer's images once: one embedding per image token,
        in the order the tokens appear (kept across preemption)."""
        mm = seq.request.multimodal
        t0 = time.perf_counter()
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in mm.encoder_inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = self.model.get_image_features(**inputs, return_dict=True)
        feats = getattr(out, "pooler_output", out)
        if isinstance(feats, (list, tuple)):
            feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
        seq.image_embeds = feats.reshape(-1, feats.shape[-1])
        seq.image_positions = [i for i, t in enumerate(seq.request.prompt_ids) if t == self.image_token_id]
        if len(seq.image_positions) != seq.image_embeds.shape[0]:
            raise ValueError(
                f"{len(seq.image_positions)} image tokens in the prompt but "
                f"{seq.image_embeds.shape[0]} image embeddings"
            )
        seq.mm_key = (seq.image_positions[0], mm.digest) if seq.image_positions else None
        if self.mrope and "image_grid_thw" in inputs:
            ids = torch.tensor([seq.request.prompt_ids], device=self.device)
            pos, delta = self.model.model.get_rope_index(
                ids, (ids == self.image_token_id).int(), image_grid_thw=inputs["image_grid_thw"]
            )
            seq.mrope_prompt, seq.mrope_delta = pos[:, 0, :], int(delta.reshape(-1)[0])
        self.stats["images_encoded"] += mm.num_images
        self.stats["time_vision_s"] += time.perf_counter() - t0

    def _score_prompts(self, logits: torch.Tensor, scoring: list) -> None:
        """Logprobs of prompt tokens: the logits at position p score token p + 1."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        row = 0
        for seq, first, count in scoring:
            top = seq.request.params.prompt_logprobs
            for j in range(count):
                token = seq.token_ids[first + j + 1]
                seq.prompt_lps.append(logprob_entries(lp, row + j, token, top, self.texts))
            row += count

    def _mrope_positions(self, seq: Sequence, start: int, n: int):
        """M-RoPE positions of tokens [start, start + n): the model's own per-axis positions over the
        prompt (images get 2-D grid positions), then one step per token on every axis."""
        prompt = seq.mrope_prompt
        if prompt is None:
            return [p + seq.mrope_delta for p in range(start, start + n)]
        inside = prompt[:, start : start + n]
        rest = max(0, start + n - prompt.shape[1])
        if not rest:
            return inside
        first = max(start, prompt.shape[1])
        tail = torch.arange(first, first + rest, device=self.device).expand(3, -1) + seq.mrope_delta
        return torch.cat([inside, tail], dim=1)

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

    # ------------------------------------------------------------------ prompts / constraints
    def render_prompt(self, messages: list[dict], **kwargs) -> list[int]:
        return self.prompts.render(messages, **kwargs)

    # plain-text prompts (/v1/completions): no chat template
    def encode_text(self, text: str, context_length: int | None = None) -> tuple[list[int], list[int] | None]:
        """A plain-text prompt as token ids, with the special tokens the tokenizer adds (a BOS, for
        some models), and each token's character offset in ``text`` (None from a tokenizer that
        gives no offsets). With context_length, text too long to fit is refused (PromptTooLong)
        before tokenizing. Blocking: call it off the event loop."""
        from .prompt import PromptTooLong

        limit = self.prompts.max_prompt_chars(context_length) if context_length is not None else None
        if limit is not None and len(text) > limit:
            raise PromptTooLong(
                f"the prompt is {len(text)} characters, but this model's context length is "
                f"{context_length} tokens and none of its tokens covers more than "
                f"{self.prompts.max_chars_per_token} characters, so at most {limit} can fit",
                param="prompt",
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # e.g. a lone surrogate from a "\\ud800" JSON escape
            raise PromptError(
                f"prompt is not valid Unicode: {exc.reason} at position {exc.start}", param="prompt"
            ) from None
        if not getattr(self.tokenizer, "is_fast", False):
            return self.tokenizer(text)["input_ids"], None
        enc = self.tokenizer(text, return_offsets_mapping=True)
        # The tokens cover the text in order: a token starts where the one before it ended, or
        # earlier when both hold bytes of one character. Byte-level tokenizers trim a token's
        # leading space off its span, and tokens the tokenizer adds (a BOS) have empty spans.
        offsets, end = [], 0
        for start, stop in enc["offset_mapping"]:
            offsets.append(min(start, end) if stop > start else end)
            end = max(end, stop)
        return enc["input_ids"], offsets

    def decode_prompt(self, ids: list[int]) -> str:
        """Token ids as text, special tokens included (a token-id prompt, echoed)."""
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_texts(self, ids: list[int]) -> list[tuple[str, list[int]]]:
        """Each token's text and raw bytes, as logprobs show them."""
        return [self.texts.get(t) for t in ids]

    def prepare_prompt(
        self, messages: list[dict], images: list | None = None, **kwargs
    ) -> tuple[list[int], MultimodalInputs | None]:
        """Prompt token ids, and for a prompt with images what the vision encoder needs.

        ``images``: PIL images in the order their parts appear. Blocking (the processor resizes
        and normalizes the images): call it off the event loop.
        """
        if not images:
            return self.render_prompt(messages, **kwargs), None
        if not self.accepts_images:
            raise PromptError("this model does not accept images (it is a text-only model)")
        ids, encoder_inputs = self.prompts.render_multimodal(messages, images, **kwargs)
        h = hashlib.sha256()
        for im in images:
            h.update(f"{im.mode}{im.size}".encode())
            h.update(im.tobytes())
        return ids, MultimodalInputs(encoder_inputs, h.hexdigest(), len(images))

    @property
    def tool_family(self) -> str:
        """How this model writes tool calls (engine.tools.FAMILIES)."""
        return self.prompts.family

    def compile_constraint(self, spec, timeout: float = 10.0):
        """ConstraintSpec -> a compiled constraint (cached); raises constraints.ConstraintError.

        Blocking (compiling a new schema can take seconds): call it off the event loop.
        """
        return self.constraints.compile(spec, timeout=timeout)

    @property
    def constraints(self):
        """The outlines constraint compiler (built on first use: the vocabulary takes a moment)."""
        if self._constraints is None:
            from .constraints import ConstraintCompiler

            self._constraints = ConstraintCompiler(
                self.tokenizer, vocab_size=self.vocab_size, eos_token_ids=self.eos_ids
            )
        return self._constraints

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
            chunks.append((seq.block_table, start, n))
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

    def _sample_and_postprocess(self, logits: torch.Tensor, seqs: list[Sequence], out) -> None:
        t0 = time.perf_counter()
        errors: dict[int, Exception] = {}
        sampled, raw_lp = sample_batch(logits, [s.row for s in seqs], errors)
        t1 = time.perf_counter()
        for i, (seq, tok) in enumerate(zip(seqs, sampled)):
            if i in errors:  # this row's logits processing failed (e.g. its constraint): it alone fails
                exc = errors[i]
                log.error("%s failed in sampling: %s: %s", seq.request.request_id, type(exc).__name__, exc)
                self._finish(seq, "error", out, error=f"internal error: {type(exc).__name__}: {exc}")
                continue
            try:
                self._postprocess(seq, tok, raw_lp, i, out)
            except Exception as exc:  # this request's bug (detokenizer, stop matcher, constraint): it alone fails
                log.exception("%s failed in postprocessing", seq.request.request_id)
                self._finish(seq, "error", out, error=f"internal error: {type(exc).__name__}: {exc}")
        self.stats["time_sample_s"] += t1 - t0
        self.stats["time_postprocess_s"] += time.perf_counter() - t1

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

    def _start_decoding(self, seq: Sequence) -> None:
        """A fully prefilled sequence moves into the running batch (a preempted one resumes)."""
        self.scheduler.start_running(seq)
        if not self.packed:
            self.batch.join(seq.prefill_cache)
            seq.prefill_cache = None
        if seq.row is None:
            req = seq.request
            seq.row = RowState(req.params, self.device, self.vocab_size, self.eos_ids, req.constraint)
            seq.detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids)
            seq.stopper = StopStringMatcher(req.params.stop)

    def _postprocess(self, seq: Sequence, token: int, raw_lp, i: int, out) -> None:
        params = seq.request.params
        seq.append(token)
        seq.row.accept(token)
        is_eos = token in self.eos_ids and not params.ignore_eos
        if params.logprobs and (not is_eos or params.eos_logprob):
            seq.pending_logprobs.append(logprob_entries(raw_lp, i, token, params.top_logprobs, self.texts))
        text, stopped = seq.stopper.feed("" if is_eos else seq.detok.add(token))
        finish = None
        if stopped or is_eos:
            finish = "stop"
        elif len(seq.output_ids) >= seq.max_tokens or seq.prompt_len + len(seq.output_ids) >= self.max_model_len:
            finish = "length"
        if finish is not None and not stopped:
            tail, stopped = seq.stopper.feed(seq.detok.flush())
            text += tail if stopped else tail + seq.stopper.flush()
        logprobs = []
        if seq.pending_logprobs and (text or finish):
            logprobs, seq.pending_logprobs = seq.pending_logprobs, []
            if stopped and not text:  # the held-back tokens were the stop string itself
                logprobs = []
        if finish is not None:
            self._finish(seq, finish, out, text=text, token_ids=[token], logprobs=logprobs)
        else:
            out.append(
                (
                    seq,
                    TokenEvent(
                        text=text,
                        token_ids=[token],
                        logprobs=logprobs,
                        prompt_tokens=seq.prompt_len,
                        completion_tokens=len(seq.output_ids),
                        cached_tokens=seq.cached_tokens,
                        prompt_logprobs=self._take_prompt_lps(seq),
                    ),
                )
            )

    def _finish(
        self,
        seq: Sequence,
        reason: str,
        out,
        *,
        text: str = "",
        token_ids=None,
        logprobs=None,
        error: str | None = None,
    ) -> None:
        if seq.finished:
            return
        seq.finished = True
        self._release(seq)
        with self._cv:
            self._in_system -= 1
        self.stats[f"finished_{reason}"] += 1
        out.append(
            (
                seq,
                TokenEvent(
                    text=text,
                    token_ids=token_ids or [],
                    logprobs=logprobs or [],
                    finish_reason=reason,
                    prompt_tokens=seq.prompt_len,
                    completion_tokens=len(seq.output_ids),
                    cached_tokens=seq.cached_tokens,
                    error=error,
                    prompt_logprobs=None if error else self._take_prompt_lps(seq),
                    queue_time=(seq.started_at or time.monotonic()) - seq.arrival,
                ),
            )
        )

    @staticmethod
    def _take_prompt_lps(seq: Sequence):
        """The prompt's logprobs, once, on the request's first event."""
        if seq.prompt_lps is None or seq.prompt_lps_sent:
            return None
        seq.prompt_lps_sent = True
        return seq.prompt_lps

    @staticmethod
    def _deliver(out: list[tuple[Sequence, TokenEvent]]) -> None:
        """Hand a step's events to their event loops: one thread-safe call per loop per step."""
        by_loop: dict = {}
        for seq, event in out:
            loop, queue = seq.sink
            by_loop.setdefault(loop, []).append((queue, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


class EventStream:
    """One request's events as the engine thread delivers them (an async iterator).

    ``ready()`` also hands over, without waiting, the events already delivered: a consumer that
    fell a few steps behind (a busy front end) catches up in one go instead of one await each.
    """

    def __init__(self, engine: Engine, request: GenerationRequest):
        self._engine, self._request = engine, request
        self._queue: asyncio.Queue[TokenEvent] | None = None
        self._seq: Sequence | None = None
        self._done = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._seq = self._engine._submit(self._request, (asyncio.get_running_loop(), self._queue))
        event = await self._queue.get()
        self._done = event.finish_reason is not None
        return event

    def ready(self) -> list[TokenEvent]:
        out: list[TokenEvent] = []
        while not self._done and self._queue is not None and not self._queue.empty():
            out.append(self._queue.get_nowait())
            self._done = out[-1].finish_reason is not None
        return out

    async def aclose(self) -> None:
        self._done = True
        if self._seq is not None and not self._seq.finished:
            self._engine.abort(self._seq)

    def __del__(self):  # dropped without being closed: the request must not run on for nobody
        seq = getattr(self, "_seq", None)
        if seq is not None and not seq.finished and not seq.aborted:
            seq.aborted = True


def _put_all(items) -> None:
    for queue, event in items:
        queue.put_nowait(event)


__all__ = ["Engine", "EngineConfig", "EngineOverloaded"]
