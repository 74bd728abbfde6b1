"""Per-row logits processing and sampling for a decode batch.

Each row has its own SamplingParams. The common cases stay batched (greedy argmax, log-softmax,
top-k for logprobs); only rows that need it get per-row work (penalties, constraints, top_p,
seeded multinomial draws with the request's own torch.Generator).

Numerically safe sampling: every temperature and top_p that validation accepts gives a valid
distribution, because one row's NaN makes torch.multinomial raise and fails the whole batch.
Near-zero temperatures are greedy (SamplingParams.greedy), the top token always survives top_p,
and the maths runs in float32 whatever dtype the model's logits come in.
"""
from __future__ import annotations

import random

import torch

from .request import SamplingParams, TokenLogprob


def make_generator(seed: int | None, device: str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else random.getrandbits(63))
    return g


class RowState:
    """What sampling needs to remember for one sequence across steps."""

    __slots__ = ("params", "generator", "counts", "constraint", "eos_ids", "num_generated", "bias")

    def __init__(self, params: SamplingParams, device: str, vocab_size: int, eos_ids: list[int],
                 constraint=None):
        self.params = params
        self.generator = None if params.greedy else make_generator(params.seed, device)
        penalized = params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device) if penalized else None
        self.constraint = constraint
        self.eos_ids = eos_ids
        self.bias = None
        if params.logit_bias:
            ids = [i for i in params.logit_bias if 0 <= i < vocab_size]
            self.bias = (torch.tensor(ids, dtype=torch.long, device=device),
                         torch.tensor([params.logit_bias[i] for i in ids], dtype=torch.float32, device=device))
        self.num_generated = 0

    @property
    def needs_row_processing(self) -> bool:
        p = self.params
        return (self.counts is not None or self.constraint is not None or self.bias is not None
                or (p.ignore_eos or self.num_generated < p.min_tokens))

    def process(self, row: torch.Tensor) -> None:
        """In-place: logit_bias, penalties (OpenAI's additive form), EOS masking, constraint mask."""
        p = self.params
        if self.bias is not None:
            row.index_add_(0, self.bias[0], self.bias[1])
        if self.counts is not None:
            row -= self.counts * p.frequency_penalty + (self.counts > 0).to(row.dtype) * p.presence_penalty
        if (p.ignore_eos or self.num_generated < p.min_tokens) and self.constraint is None:
            row[self.eos_ids] = float("-inf")   # (a constraint decides where EOS may go)
        if self.constraint is not None:
            self.constraint.mask_logits(row)

    def accept(self, token_id: int) -> None:
        self.num_generated += 1
        if self.counts is not None:
            self.counts[token_id] += 1.0
        if self.constraint is not None:
            self.constraint.advance(token_id)


def _sample_row(row: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    """One seeded draw from a float32 row; p.temperature is at least GREEDY_TEMPERATURE here."""
    logits = row / p.temperature
    if p.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        cum = torch.cumsum(probs, dim=-1)
        # drop tokens whose preceding mass already reaches top_p. The first token's preceding mass
        # is 0, and a top_p below float32's smallest subnormal (1e-46, 5e-324) rounds to 0 in the
        # comparison, so the first token is kept explicitly: an all -inf row would softmax to NaN.
        drop = (cum - probs) >= p.top_p
        drop[0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        choice = torch.multinomial(probs, 1, generator=generator)
        return int(idx[choice])
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_batch(logits: torch.Tensor, rows: list[RowState]) -> tuple[list[int], torch.Tensor | None]:
    """Pick one token per row. logits: [B, V], float32 (modified in place) or a half type (copied
    to float32 first: penalties, masks and softmax in float16 overflow or lose the top token).

    Returns the token ids and, when some row asked for logprobs, the log-softmax of the model's
    raw logits (before penalties, temperature and masks, as OpenAI and vLLM report them).
    """
    logits = logits.float()
    want_lp = any(r.params.logprobs for r in rows)
    raw_lp = torch.log_softmax(logits, dim=-1) if want_lp else None
    for i, r in enumerate(rows):
        if r.needs_row_processing:
            r.process(logits[i])
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for i, r in enumerate(rows):
        tokens.append(greedy[i] if r.generator is None else _sample_row(logits[i], r.params, r.generator))
    return tokens, raw_lp


def logprob_entries(raw_lp: torch.Tensor, row: int, token_id: int, top_n: int, texts) -> TokenLogprob:
    lp = raw_lp[row]
    text, raw = texts.get(token_id)
    top: list[TokenLogprob] = []
    if top_n > 0:
        vals, ids = torch.topk(lp, top_n)
        for v, t in zip(vals.tolist(), ids.tolist()):
            ttext, traw = texts.get(t)
            top.append(TokenLogprob(token=ttext, logprob=v, bytes=traw))
    return TokenLogprob(token=text, logprob=float(lp[token_id]), bytes=raw, top_logprobs=top)
