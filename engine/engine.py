"""The engine: a step loop over a continuously batched set of sequences.

step() = schedule (admission, aborts, queue timeouts, which prompts start and how many of their
tokens, the prefix cache) -> run (one packed forward: every running row's next token plus this
step's prompt chunks, engine/packed.py) -> postprocess (per-row sampling, detokenization, stop
checks, events to each request's own stream; finished rows leave the batch).

Models the packed forward does not fit (its self-test fails) take the unpacked path: a batch-1
forward per prompt chunk, then one decode forward over the running rows.

The loop runs on its own thread; ``generate()`` is the async public API: submit a request, get an
async stream of TokenEvents.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from . import packed
from .batch import DecodeBatch
from .detokenize import IncrementalDetokenizer, StopStringMatcher, TokenTexts
from .loader import LoadedModel
from .prefix_cache import PrefixCache
from .prompt import PromptRenderer
from .request import GenerationRequest, TokenEvent
from .sampling import RowState, logprob_entries, sample_batch
from .scheduler import EngineOverloaded, Scheduler, Sequence

log = logging.getLogger("chatserve.engine")


@dataclass
class EngineConfig:
    max_running: int = 32          # rows decoded together
    max_waiting: int = 256         # requests queued beyond the running ones; more get 429
    queue_timeout: float | None = 300.0   # seconds a request may wait to start
    prefill_chunk: int = 512       # prompt tokens prefilled per step
    max_newcomers: int = 1         # prompts started per step while rows are decoding
    packed: bool = True            # prefill chunks ride in the decode step's forward (engine/packed.py)
    prefix_cache_mb: int = 256     # prompt KV kept for reuse by prompts with the same start; 0 = off


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = config or EngineConfig()
        self.device = loaded.device
        self.max_model_len = loaded.max_model_len
        self.model_name = loaded.name
        self.prompts = PromptRenderer(self.tokenizer)
        self.texts = TokenTexts(self.tokenizer)
        self.eos_ids = self._eos_ids()
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.scheduler = Scheduler(self.config.max_running, self.config.max_waiting,
                                   self.config.queue_timeout, self.config.prefill_chunk, self.config.max_newcomers)
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
        self.packed = self.config.packed and packed.install(self.model, self._cache_kw, self.device)
        log.info("engine steps: %s", "packed (prefill chunks join the decode forward)" if self.packed
                 else "separate batch-1 prefill forwards, then one decode forward")
        self.prefix_cache = self._make_prefix_cache()
        self._cv = threading.Condition()
        self._inbox: list[Sequence] = []
        self._in_system = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._crashed: BaseException | None = None
        self._constraints = None
        self.stats = defaultdict(int)

    # ------------------------------------------------------------------ lifecycle
    def _eos_ids(self) -> list[int]:
        ids = set()
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        for e in (eos if isinstance(eos, (list, tuple)) else [eos]):
            if e is not None:
                ids.add(int(e))
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return sorted(ids)

    def _make_prefix_cache(self) -> PrefixCache | None:
        if self.config.prefix_cache_mb <= 0:
            return None
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        block = 16
        elem = next(self.model.parameters()).element_size()
        per_block = cfg.num_hidden_layers * 2 * kv_heads * head_dim * block * elem
        max_blocks = max(1, self.config.prefix_cache_mb * 2**20 // per_block)
        log.info("prefix cache: up to %d blocks of %d tokens (%d MB)", max_blocks, block, self.config.prefix_cache_mb)
        return PrefixCache(max_blocks, block)

    def _begin_prefill(self, seq: Sequence) -> None:
        if self.prefix_cache is None:
            seq.prefill_cache = DynamicCache(config=self.model.config)
            return
        seq.prefill_cache, seq.num_prefilled = self.prefix_cache.start(seq.request.prompt_ids, self.model.config)
        seq.cached_tokens = seq.num_prefilled
        self.stats["prefix_cache_hit_tokens"] += seq.cached_tokens
        self.stats["prefix_cache_blocks"] = self.prefix_cache.blocks

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="chatserve-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

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
            self._constraints = ConstraintCompiler(self.tokenizer, vocab_size=self.vocab_size,
                                                   eos_token_ids=self.eos_ids)
        return self._constraints

    # ------------------------------------------------------------------ public API
    async def generate(self, request: GenerationRequest):
        """Async stream of TokenEvents for one request; the last one has finish_reason set.

        Raises EngineOverloaded at once when the queue is full. Closing the stream early (client
        gone, task cancelled) aborts the request; its row leaves the batch at the next step.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        seq = self._submit(request, (loop, queue))
        try:
            while True:
                event = await queue.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if not seq.finished:
                self.abort(seq)

    def _submit(self, request: GenerationRequest, sink) -> Sequence:
        if not self.alive:
            raise RuntimeError("engine is not running")
        params = request.params
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(request.prompt_ids)
        seq = Sequence(request=request, sink=sink, max_tokens=max(0, max_tokens))
        with self._cv:
            limit = self.config.max_running + self.config.max_waiting
            if self._in_system >= limit:
                self.stats["rejected"] += 1
                raise EngineOverloaded(
                    f"server is at capacity ({self.config.max_running} running, "
                    f"{self.config.max_waiting} waiting); retry later", retry_after=self._retry_after())
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
        log.info("engine loop started (max_running=%d, max_waiting=%d, prefill_chunk=%d)",
                 self.config.max_running, self.config.max_waiting, self.config.prefill_chunk)
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
                log.exception("engine step failed; failing %d running and prefilling requests",
                              self.scheduler.num_running)
                self._fail_all(f"internal error: {type(exc).__name__}: {exc}")
        self._fail_all("server is shutting down", waiting_too=True)

    def _fail_all(self, message: str, waiting_too: bool = False) -> None:
        out: list[tuple[Sequence, TokenEvent]] = []
        victims = list(self.scheduler.running)
        victims += [s for s in self.scheduler.waiting if waiting_too or s.prefill_cache is not None]
        for seq in victims:
            self._finish(seq, "error", out, error=message)
        self.scheduler.running = []
        self.scheduler.waiting = deque(s for s in self.scheduler.waiting if not s.finished)
        self.batch = DecodeBatch(self.device, self._cache_kw)
        self._deliver(out)

    def step(self) -> None:
        out: list[tuple[Sequence, TokenEvent]] = []
        sched = self.scheduler
        # -- schedule: aborts, queue timeouts
        gone_waiting, gone_rows = sched.take_aborted()
        for seq in gone_waiting:
            self._finish(seq, "abort", out)
        if gone_rows:
            for seq in sched.remove_rows(gone_rows):
                self._finish(seq, "abort", out)
            self.batch.remove(gone_rows)
        for seq in sched.timed_out(time.monotonic()):
            self._finish(seq, "error", out, error="queue_timeout")
        if self.packed:
            self._run_packed(sched.prefill_work(self._begin_prefill), out)
        else:
            out = self._run_unpacked(sched.prefill_work(self._begin_prefill), out)
        finished = [i for i, s in enumerate(sched.running) if s.finished]
        if finished:
            sched.remove_rows(finished)
            self.batch.remove(finished)
        self._deliver(out)

    def _run_packed(self, work: list[tuple[Sequence, int]], out) -> None:
        """One forward: the next token of every running row, then this step's prompt chunks."""
        sched = self.scheduler
        rows = list(sched.running)
        tokens = [s.output_ids[-1] for s in rows]
        positions, mask = self.batch.prepare_decode() if rows else ([], None)
        keep = list(range(len(rows)))
        segments, completing = [], []
        for seq, n in work:
            start = seq.num_prefilled
            tokens += seq.request.prompt_ids[start:start + n]
            positions += range(start, start + n)
            segments.append(packed.Segment(seq.prefill_cache, start, n))
            seq.num_prefilled += n
            self.stats["prefill_tokens"] += n
            if seq.num_prefilled >= seq.prompt_len:
                completing.append(seq)
                keep.append(len(tokens) - 1)
        if not tokens:
            return
        step = packed.PackedStep(self.batch.cache if rows else None, len(rows), mask, segments)
        t0 = time.perf_counter()
        logits = packed.forward(self.model, self._cache_kw, tokens, positions, step, keep, self.device)
        t1 = time.perf_counter()
        self.stats["time_forward_s"] += t1 - t0
        for seq in completing:   # newcomers join the batch after the rows that decoded this step
            self._start_decoding(seq)
        stepping = rows + completing
        t2 = time.perf_counter()
        sampled, raw_lp = sample_batch(logits, [s.row for s in stepping])
        t3 = time.perf_counter()
        if rows:
            self.stats["decode_steps"] += 1
            self.stats["decode_rows"] += len(rows)
        for i, (seq, tok) in enumerate(zip(stepping, sampled)):
            self._postprocess(seq, tok, raw_lp, i, out)
        t4 = time.perf_counter()
        self.stats["time_join_s"] += t2 - t1
        self.stats["time_sample_s"] += t3 - t2
        self.stats["time_postprocess_s"] += t4 - t3

    def _run_unpacked(self, work: list[tuple[Sequence, int]], out) -> list:
        """Fallback for models packed steps do not fit: a batch-1 forward per prefill chunk, then
        one decode forward over the running rows."""
        sched = self.scheduler
        for seq, n in work:
            logits = self._prefill(seq, n)
            if seq.num_prefilled < seq.prompt_len:
                continue
            self._start_decoding(seq)
            tokens, raw_lp = sample_batch(logits, [seq.row])
            self._postprocess(seq, tokens[0], raw_lp, 0, out)
            self._deliver(out)   # its first token goes out now, not after the rest of the step
            out = []
        finished = [i for i, s in enumerate(sched.running) if s.finished]
        if finished:
            sched.remove_rows(finished)
            self.batch.remove(finished)
        if sched.running:
            kwargs = self.batch.decode_inputs([s.output_ids[-1] for s in sched.running])
            logits = self.model(**kwargs, logits_to_keep=1).logits[:, -1, :].float()
            tokens, raw_lp = sample_batch(logits, [s.row for s in sched.running])
            self.stats["decode_steps"] += 1
            self.stats["decode_rows"] += len(tokens)
            for i, (seq, tok) in enumerate(zip(sched.running, tokens)):
                self._postprocess(seq, tok, raw_lp, i, out)
        return out

    def _prefill(self, seq: Sequence, n: int) -> torch.Tensor:
        if seq.prefill_cache is None:
            seq.prefill_cache = DynamicCache(config=self.model.config)
        start = seq.num_prefilled
        ids = torch.tensor([seq.request.prompt_ids[start:start + n]], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + n, device=self.device)
        out = self.model(input_ids=ids, position_ids=positions.unsqueeze(0), cache_position=positions,
                         use_cache=True, logits_to_keep=1, **{self._cache_kw: seq.prefill_cache})
        seq.num_prefilled += n
        self.stats["prefill_tokens"] += n
        return out.logits[:, -1, :].float()

    def _start_decoding(self, seq: Sequence) -> None:
        """A fully prefilled prompt: keep its KV for reuse, move it into the decode batch."""
        if self.prefix_cache is not None:
            self.prefix_cache.insert(seq.request.prompt_ids, seq.prefill_cache)
        self.scheduler.start_running(seq)
        self.batch.join(seq.prefill_cache)
        seq.prefill_cache = None
        req = seq.request
        seq.row = RowState(req.params, self.device, self.vocab_size, self.eos_ids, req.constraint)
        seq.detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids)
        seq.stopper = StopStringMatcher(req.params.stop)

    def _postprocess(self, seq: Sequence, token: int, raw_lp, i: int, out) -> None:
        params = seq.request.params
        seq.output_ids.append(token)
        seq.row.accept(token)
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        is_eos = token in self.eos_ids and not params.ignore_eos
        if params.logprobs and not is_eos:
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
            if stopped and not text:   # the held-back tokens were the stop string itself
                logprobs = []
        if finish is not None:
            self._finish(seq, finish, out, text=text, token_ids=[token], logprobs=logprobs)
        else:
            out.append((seq, TokenEvent(text=text, token_ids=[token], logprobs=logprobs,
                                        prompt_tokens=seq.prompt_len, completion_tokens=len(seq.output_ids),
                                        cached_tokens=seq.cached_tokens)))

    def _finish(self, seq: Sequence, reason: str, out, *, text: str = "", token_ids=None, logprobs=None,
                error: str | None = None) -> None:
        if seq.finished:
            return
        seq.finished = True
        seq.prefill_cache = None
        with self._cv:
            self._in_system -= 1
        self.stats[f"finished_{reason}"] += 1
        out.append((seq, TokenEvent(text=text, token_ids=token_ids or [], logprobs=logprobs or [],
                                    finish_reason=reason, prompt_tokens=seq.prompt_len,
                                    completion_tokens=len(seq.output_ids), cached_tokens=seq.cached_tokens,
                                    error=error)))

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
            except RuntimeError:   # the loop is closed: nobody is listening any more
                pass


def _put_all(items) -> None:
    for queue, event in items:
        queue.put_nowait(event)


__all__ = ["Engine", "EngineConfig", "EngineOverloaded"]
