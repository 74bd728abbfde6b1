"""Sequences and the waiting / running queues, admission and cancellation."""
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
    sink: object                              # callable(TokenEvent), thread-safe
    max_tokens: int
    arrival: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_ids))
    # prefill
    prefill_cache: object = None              # own DynamicCache while the prompt is being prefilled
    num_prefilled: int = 0
    cached_tokens: int = 0                    # prompt tokens taken from the prefix cache
    # decode
    output_ids: list[int] = field(default_factory=list)
    row: object = None                        # sampling.RowState
    detok: object = None                      # detokenize.IncrementalDetokenizer
    stopper: object = None                    # detokenize.StopStringMatcher
    pending_logprobs: list = field(default_factory=list)
    aborted: bool = False
    finished: bool = False
    first_token_at: float | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)


class Scheduler:
    """FIFO admission with a cap on running rows and on waiting requests."""

    def __init__(self, max_running: int, max_waiting: int, queue_timeout: float | None,
                 prefill_chunk: int, max_newcomers: int = 1):
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.queue_timeout = queue_timeout
        self.prefill_chunk = prefill_chunk
        self.max_newcomers = max_newcomers
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []        # in batch row order

    def admit(self, seq: Sequence) -> None:
        # Called on the engine thread's inbox drain; Engine._submit already applied the cap.
        self.waiting.append(seq)

    def timed_out(self, now: float) -> list[Sequence]:
        if not self.queue_timeout:
            return []
        out = [s for s in self.waiting if s.prefill_cache is None and now - s.arrival > self.queue_timeout]
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
        not by all of it. ``begin(seq)`` is called once for a sequence about to get its first chunk (the engine
        starts its cache there, from the prefix cache when it can: fewer tokens left to prefill).
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
        for seq in self.waiting:
            if slots <= 0 or budget <= 0 or newcomers <= 0:
                break
            if seq.prefill_cache is None and begin is not None:
                begin(seq)
            remaining = seq.prompt_len - seq.num_prefilled
            n = min(remaining, budget)
            work.append((seq, n))
            budget -= n
            if n < remaining:
                break   # a partially prefilled prompt continues next step
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

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)
