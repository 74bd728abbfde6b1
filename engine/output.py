"""What a step's logits become: batched sampling, then per row the token appended, logprobs,
detokenized text, stop checks and a TokenEvent; finished sequences release their KV. A fault in
one row (its constraint, detokenizer or stop matcher) fails that request alone."""

from __future__ import annotations

import logging
import time

import torch

from .detokenize import IncrementalDetokenizer, StopStringMatcher
from .request import TokenEvent
from .sampling import RowState, logprob_entries, sample_batch
from .scheduler import Sequence

log = logging.getLogger("chatserve.engine")


class OutputMixin:
    """Part of Engine (engine.py): a step's logits to tokens, and tokens to each request's events."""

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

    def _sample_and_postprocess(self, logits: torch.Tensor, seqs: list[Sequence], out) -> None:
        t0 = time.perf_counter()
        logits = logits.to(self.device)  # beside the rows' sampling state (a no-op unless the model spans devices)
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
