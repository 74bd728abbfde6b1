"""Per-row logits processing and batched sampling for a decode batch.

Each row has its own SamplingParams; sampling is batched tensor work (see sample_batch), and only
rows that need it get per-row logits processing (bias, penalties, constraints).

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

    def __init__(self, params: SamplingParams, device: str, vocab_size: int, eos_ids: list[int], constraint=None):
        self.params = params
        self.generator = None if params.greedy else make_generator(params.seed, device)
        penalized = params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device) if penalized else None
        self.constraint = constraint
        self.eos_ids = eos_ids
        self.bias = None
        if params.logit_bias:
            ids = [i for i in params.logit_bias if 0 <= i < vocab_size]
            self.bias = (
                torch.tensor(ids, dtype=torch.long, device=device),
                torch.tensor([params.logit_bias[i] for i in ids], dtype=torch.float32, device=device),
            )
        self.num_generated = 0

    @property
    def masks_eos(self) -> bool:
        """EOS is barred this step (ignore_eos, min_tokens); a constraint decides EOS itself."""
        p = self.params
        return (p.ignore_eos or self.num_generated < p.min_tokens) and self.constraint is None

    @property
    def needs_row_processing(self) -> bool:
        """Per-row work beyond EOS masking (which sample_batch does for all rows at once)."""
        return self.counts is not None or self.constraint is not None or self.bias is not None

    def process(self, row: torch.Tensor) -> None:
        """In-place: logit_bias, penalties (OpenAI's additive form), constraint mask."""
        p = self.params
        if self.bias is not None:
            row.index_add_(0, self.bias[0], self.bias[1])
        if self.counts is not None:
            row -= self.counts * p.frequency_penalty + (self.counts > 0).to(row.dtype) * p.presence_penalty
        if self.constraint is not None:
            self.constraint.mask_logits(row)

    def accept(self, token_id: int) -> None:
        self.num_generated += 1
        if self.counts is not None:
            self.counts[token_id] += 1.0
        if self.constraint is not None:
            self.constraint.advance(token_id)


_EOS_INDEX: dict = {}


def _eos_index(eos_ids: list[int], device) -> torch.Tensor:
    key = (tuple(eos_ids), str(device))
    if key not in _EOS_INDEX:
        _EOS_INDEX[key] = torch.tensor(eos_ids, dtype=torch.long, device=device)
    return _EOS_INDEX[key]


def sample_batch(
    logits: torch.Tensor, rows: list[RowState], errors: dict[int, Exception] | None = None
) -> tuple[list[int | None], torch.Tensor | None]:
    """Pick one token per row. logits: [B, V], float32 (modified in place) or a half type (copied
    to float32 first: penalties, masks and softmax in float16 overflow or lose the top token).

    Returns the token ids and, when some row asked for logprobs, the log-softmax of the model's
    raw logits (before penalties, temperature and masks, as OpenAI and vLLM report them).

    Batched: greedy rows take one argmax over the batch; sampling rows share one temperature
    division, top_p cut and softmax, and draw by the exponential race (argmax of p / E with E ~
    Exp(1): a sample from p), each row's noise drawn from its own generator, in vocabulary order,
    so a seeded row draws the same tokens alone or beside any other rows. Only the per-row logits
    processors (bias, penalties, EOS masking, constraint masks) loop over the rows that have them.

    With ``errors`` given, a row whose processing raises is recorded there (its token is None)
    and the other rows are sampled as if it were not there; without it, the exception propagates.
    """
    logits = logits.float()
    want_lp = any(r.params.logprobs for r in rows)
    raw_lp = torch.log_softmax(logits, dim=-1) if want_lp else None
    failed: dict[int, Exception] = errors if errors is not None else {}
    barred = [i for i, r in enumerate(rows) if r.masks_eos and r.eos_ids]
    if barred:  # one indexed write for every row that may not end yet
        dev = logits.device
        logits[torch.tensor(barred, device=dev)[:, None], _eos_index(rows[barred[0]].eos_ids, dev)[None, :]] = float(
            "-inf"
        )
    for i, r in enumerate(rows):
        if r.needs_row_processing:
            try:
                r.process(logits[i])
            except Exception as exc:
                if errors is None:
                    raise
                failed[i] = exc
                logits[i] = 0.0  # keeps the batched maths below finite
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, r in enumerate(rows) if r.generator is not None and i not in failed]
    if sampled:
        dev = logits.device
        idx = torch.tensor(sampled, dtype=torch.long, device=dev)
        temps = torch.tensor([rows[i].params.temperature for i in sampled], dtype=torch.float32, device=dev)
        x = logits.index_select(0, idx) / temps[:, None]
        top_ps = [rows[i].params.top_p for i in sampled]
        if min(top_ps) < 1.0:
            # keep the smallest set of tokens whose mass reaches top_p: drop a token once the mass
            # before it does. The top token is always kept: a top_p below float32's smallest
            # subnormal (1e-46, 5e-324) rounds to 0 and would drop everything (NaN after softmax).
            # Rows with top_p 1 drop nothing (not even through cumsum rounding past 1).
            cut = torch.tensor([p if p < 1.0 else float("inf") for p in top_ps], dtype=torch.float32, device=dev)
            sorted_x, order = torch.sort(x, dim=-1, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            drop = (torch.cumsum(probs, dim=-1) - probs) >= cut[:, None]
            drop[:, 0] = False
            x = x.scatter(1, order, sorted_x.masked_fill(drop, float("-inf")))
        probs = torch.softmax(x, dim=-1)
        noise = torch.empty_like(probs)
        for j, i in enumerate(sampled):
            noise[j].exponential_(generator=rows[i].generator)
        tokens[idx] = (probs / noise.clamp_min_(1e-30)).argmax(dim=-1)
    out: list[int | None] = tokens.tolist()
    for i in failed:
        out[i] = None
    return out, raw_lp


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
