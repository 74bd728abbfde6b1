"""Sequences and the waiting / running queues, admission, preemption and cancellation."""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from .request import GenerationRequest


class EngineOverloaded(RuntimeError):
    """Admission refused: too many waiting requests (HTTP 429)."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    sink: object  # (event loop, asyncio.Queue) its events go to
    max_tokens: int
    arrival: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_ids))
    token_ids: list[int] = field(default_factory=list)  # prompt + output so far
    # KV: block ids in the pool (engine/block_manager.py), or the fallback path's own cache
    block_table: list[int] = field(default_factory=list)
    prefill_cache: object = None  # fallback path: own DynamicCache while prefilling
    started: bool = False  # holds KV (blocks or a prefill cache)
    num_prefilled: int = 0  # tokens of token_ids whose KV is computed (while prefilling)
    num_registered: int = 0  # full blocks offered to the prefix cache
    prev_hash: int | None = None  # hash of the last of them
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    preemptions: int = 0
    # images: their embeddings (vision encoder output, one row per image token) and where those tokens are
    image_embeds: object = None
    image_positions: list[int] = field(default_factory=list)
    mm_key: tuple | None = None  # (first image token, images' digest): the prefix-cache key
    # models whose image tokens attend to each other both ways (Gemma 3): each image's [start, end)
    image_runs: list[tuple[int, int]] = field(default_factory=list)
    mrope_prompt: object = None  # M-RoPE models: the prompt's [3, L] positions (with images)
    mrope_delta: int = 0  # and how far later positions are shifted
    prompt_lps: list | None = None  # prompt logprobs computed so far (when asked for)
    prompt_lps_sent: bool = False
    started_at: float | None = None  # when it first got KV (its queue time ends)
    start_order: int = 0  # when it last got KV: the newest is preempted first
    # decode
    output_ids: list[int] = field(default_factory=list)
    row: object = None  # sampling.RowState
    detok: object = None  # detokenize.IncrementalDetokenizer
    stopper: object = None  # detokenize.StopStringMatcher
    pending_logprobs: list = field(default_factory=list)
    aborted: bool = False
    finished: bool = False

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.request.prompt_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def whole_images(self, start: int, n: int) -> int:
        """``n`` prompt tokens from ``start``, moved so the chunk does not end inside an image whose
        tokens attend to each other both ways (``image_runs``): every token of an image must be in
        the step that computes any of them. The chunk then ends before that image, or, if it starts
        inside or at it, at its end."""
        end = start + n
        for a, b in self.image_runs:
            if a < end < b:
                return a - start if a > start else b - start
        return n

    def append(self, token: int) -> None:
        self.output_ids.append(token)
        self.token_ids.append(token)


class Scheduler:
    """FIFO admission: a cap on running rows, and (in the engine's ``begin``) free KV blocks.

    ``waiting`` holds requests not yet decoding, in order; those being prefilled are at its head
    (``started``). ``running`` holds the decoding ones in the order they started, so the newest is
    last: it is the one preempted when the pool runs out of blocks. The cap on waiting requests is
    applied by ``Engine._submit``, before a request reaches the scheduler.
    """

    def __init__(self, max_running: int, queue_timeout: float | None, prefill_chunk: int, max_newcomers: int = 1):
        self.max_running = max_running
        self.queue_timeout = queue_timeout
        self.prefill_chunk = prefill_chunk
        self.max_newcomers = max_newcomers
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in batch row order

    def admit(self, seq: Sequence) -> None:
        # Called on the engine thread's inbox drain; Engine._submit already applied the cap.
        self.waiting.append(seq)

    def timed_out(self, now: float) -> list[Sequence]:
        if not self.queue_timeout:
            return []
        out = [s for s in self.waiting if not s.started and now - s.arrival > self.queue_timeout]
        for s in out:
            self.waiting.remove(s)
        return out

    def take_aborted(self) -> tuple[list[Sequence], list[int]]:
        """Aborted waiting sequences, and the batch rows of aborted running ones."""
        gone_waiting = [s for s in self.waiting if s.aborted]
        for s in gone_waiting:
            self.waiting.remove(s)
        rows = [i for i, s in enumerate(self.running) if s.aborted]
        return gone_waiting, rows

    def prefill_work(self, begin=None) -> list[tuple[Sequence, int]]:
        """(sequence, number of prompt tokens to run now), within this step's token budget.

        Each prompt is prefilled into its own cache (no padding), at most ``prefill_chunk`` prompt
        tokens per step in all, so a long prompt delays the running streams by one chunk per step,
        not by all of it. ``begin(seq)`` is called once for a sequence about to get its first chunk: the
        engine gives it its KV there (blocks, from the prefix cache when it can: fewer tokens left to
        prefill) and returns False when the pool has no room for it yet (admission stops there, FIFO).
        While rows are decoding, a step starts ``max_newcomers`` prompts (default 1), or a quarter
        of the prompts that have a free row waiting for them if that is more. One at a time keeps
        each newcomer's step short (its first token comes sooner) and keeps arrivals from falling
        into lockstep waves; the quarter fills a mostly empty batch in a few steps instead of one
        step per prompt, since an idle row costs more than a slightly longer step.
        """
        budget = self.prefill_chunk
        work = []
        slots = self.max_running - len(self.running)
        ready = min(slots, len(self.waiting))
        newcomers = max(self.max_newcomers, -(-ready // 4)) if self.running else slots
        # prompts already holding KV first (one preempted back to the head must not stall them)
        order = [s for s in self.waiting if s.started] + [s for s in self.waiting if not s.started]
        for seq in order:
            if slots <= 0 or budget <= 0 or newcomers <= 0:
                break
            if not seq.started and begin is not None and not begin(seq):
                break
            remaining = seq.num_tokens - seq.num_prefilled
            n = seq.whole_images(seq.num_prefilled, min(remaining, budget))
            work.append((seq, n))
            budget -= n
            if n < remaining:
                break  # a partially prefilled prompt continues next step
            slots -= 1
            newcomers -= 1
        return work

    def start_running(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        self.running.append(seq)

    def remove_rows(self, rows: list[int]) -> list[Sequence]:
        drop = set(rows)
        gone = [s for i, s in enumerate(self.running) if i in drop]
        self.running = [s for i, s in enumerate(self.running) if i not in drop]
        return gone

    def preempt(self, seq: Sequence) -> None:
        """Back to the head of the queue (its KV was freed): it is prefilled again, prompt and
        output so far, and then continues where it stopped."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.waiting.appendleft(seq)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)
