"""One forward per engine step: every decoding row's next token and newcomers' prompt chunks, packed.

The model runs on a single packed sequence ``[1, N]``: first one token for each decoding row (in
batch row order), then the prompt chunks of the sequences being prefilled. Everything that works
per token (embeddings, RoPE from per-token position ids, the linear layers, norms) runs on all N
tokens at once, so a newcomer's prefill shares the decode step's matrix multiplications instead
of paying for a forward of its own. Only attention cares which sequence a token belongs to, and
it is done here, per part:

* decode rows attend over the running batch's left-padded KV cache (engine.batch.DecodeBatch),
  each row one query against its own columns (a padding mask hides the rest);
* each prefill chunk attends causally over its own batch-1 cache (earlier chunks of the same
  prompt plus itself).

This is wired into transformers through its documented extension points: ``PackedStep`` is passed
as the model's cache (``update()`` stores each part's keys and values where they belong) and
``packed_attention`` is registered with ``AttentionInterface`` as the model's attention
implementation; outside a packed step it simply calls transformers' SDPA attention. A 4-D
placeholder attention mask makes transformers skip building a mask of its own. Models whose
attention layers do something this does not expect are caught by ``install()``'s self-test,
which compares packed logits against plain forwards and leaves the model untouched if they differ.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger("chatserve.engine")

NAME = "chatserve_packed"
# A 4-D attention_mask is taken by transformers as already prepared and handed to attention as is.
_placeholder_masks: dict[str, torch.Tensor] = {}


@dataclass
class Segment:
    cache: DynamicCache   # the sequence's own batch-1 cache
    past: int             # prompt tokens already in it
    n: int                # tokens in this chunk


class _LayerRef:
    """What PackedStep.update returns in place of key/value tensors: the step and the layer index."""
    __slots__ = ("step", "layer")

    def __init__(self, step: "PackedStep", layer: int):
        self.step, self.layer = step, layer


class PackedStep:
    """The layout of one packed forward, passed to the model as its cache."""
    is_compileable = False

    def __init__(self, batch_cache: DynamicCache | None, rows: int, decode_mask: torch.Tensor | None,
                 segments: list[Segment]):
        self.batch_cache = batch_cache   # the decode batch's cache (rows x columns), None without rows
        self.rows = rows
        self.decode_mask = decode_mask   # [rows, 1, 1, columns] bool, None when no row has padding
        self.segments = segments
        self._segment_masks: dict[tuple[int, int], torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        rows = self.rows
        if rows:
            # [1, H, N, D] -> this step's column for each row: [rows, H, 1, D]
            k = key_states[0, :, :rows].transpose(0, 1).unsqueeze(2)
            v = value_states[0, :, :rows].transpose(0, 1).unsqueeze(2)
            self.batch_cache.layers[layer_idx].update(k, v)
        off = rows
        for seg in self.segments:
            seg.cache.update(key_states[:, :, off:off + seg.n], value_states[:, :, off:off + seg.n], layer_idx)
            off += seg.n
        ref = _LayerRef(self, layer_idx)
        return ref, ref

    def segment_mask(self, past: int, n: int, device) -> torch.Tensor:
        """Causal mask of a chunk that continues a prompt: [1, 1, n, past + n], True = attend."""
        key = (past, n)
        if key not in self._segment_masks:
            self._segment_masks[key] = torch.ones(n, past + n, dtype=torch.bool, device=device).tril(past)[None, None]
        return self._segment_masks[key]

    # transformers asks a few things of the object passed as the cache
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    if not isinstance(key, _LayerRef):   # not a packed step: plain SDPA attention
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    step, li = key.step, key.layer
    parts = []
    rows = step.rows
    if rows:
        layer = step.batch_cache.layers[li]
        q = query[0, :, :rows].transpose(0, 1).unsqueeze(2)            # [rows, H, 1, D]
        out, _ = sdpa_attention_forward(module, q, layer.keys, layer.values, step.decode_mask,
                                        scaling=scaling, is_causal=False)
        parts.append(out.reshape(rows, *out.shape[2:]))                 # [rows, H, D]
    off = rows
    for seg in step.segments:
        layer = seg.cache.layers[li]
        q = query[:, :, off:off + seg.n]
        mask = None if seg.past == 0 else step.segment_mask(seg.past, seg.n, query.device)
        out, _ = sdpa_attention_forward(module, q, layer.keys, layer.values, mask, scaling=scaling, is_causal=True)
        parts.append(out[0])                                            # [n, H, D]
        off += seg.n
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return out.unsqueeze(0), None                                       # [1, N, H, D]


AttentionInterface.register(NAME, packed_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def forward(model, cache_kw: str, tokens: list[int], positions: list[int], step: PackedStep,
            keep: list[int], device) -> torch.Tensor:
    """Run one packed step; returns float logits at the packed indices ``keep`` ([len(keep), V])."""
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    pos = torch.tensor([positions], dtype=torch.long, device=device)
    mask = _placeholder_masks.get(str(device))
    if mask is None:   # made once per device, not copied to it every step
        mask = _placeholder_masks[str(device)] = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
    out = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True,
                logits_to_keep=torch.tensor(keep, dtype=torch.long, device=device), **{cache_kw: step})
    return out.logits[0].float()


def install(model, cache_kw: str, device) -> bool:
    """Switch the model's attention to packed_attention if it gives the same logits; False if not."""
    original = model.config._attn_implementation
    if original not in ("sdpa", NAME):
        log.info("packed steps off: the model uses %s attention, not sdpa", original)
        return False
    cfg = model.config
    layer_types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    sliding = getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)
    if layer_types != {"full_attention"} or sliding:
        # packed_attention attends over the whole cache: a window (or a non-attention layer) would be
        # ignored, and a short self-test cannot see that
        log.info("packed steps off: the model has sliding-window or non-attention layers (%s)", sorted(layer_types))
        return False
    try:
        model.set_attn_implementation(NAME)
        ok, err = _self_test(model, cache_kw, device)
    except Exception as exc:   # an architecture that does not fit: keep the padded path
        ok, err = False, f"{type(exc).__name__}: {exc}"
    if not ok:
        log.warning("packed steps off for this model (self-test: %s); using one forward per prefill", err)
        model.set_attn_implementation(original)
    return ok


def _self_test(model, cache_kw: str, device) -> tuple[bool, str]:
    """Two sequences through two packed steps (fresh prompt, chunk continuation, decode row with
    padding) against plain forwards of the same tokens."""
    from .batch import DecodeBatch

    vocab = model.get_output_embeddings().weight.shape[0]
    a = [(7 * i + 3) % vocab for i in range(7)]
    b = [(11 * i + 5) % vocab for i in range(5)]
    with torch.inference_mode():
        def plain(ids):
            return model(input_ids=torch.tensor([ids], device=device), logits_to_keep=1).logits[0, -1].float()

        batch = DecodeBatch(device, cache_kw)
        ca, cb = DynamicCache(config=model.config), DynamicCache(config=model.config)
        # step 1: prompt a[:6] whole, prompt b in a first chunk of 2 tokens
        step = PackedStep(None, 0, None, [Segment(ca, 0, 6), Segment(cb, 0, 2)])
        first = forward(model, cache_kw, a[:6] + b[:2], list(range(6)) + [0, 1], step, [5], device)
        batch.join(ca)
        # step 2: a decodes a[6] (as the batch's only row), b's second chunk b[2:5]
        positions, mask = batch.prepare_decode()
        step = PackedStep(batch.cache, 1, mask, [Segment(cb, 2, 3)])
        second = forward(model, cache_kw, [a[6]] + b[2:5], positions + [2, 3, 4], step, [0, 3], device)
        refs = [plain(a[:6]), plain(a), plain(b)]
        got = [first[0], second[0], second[1]]
    worst = max(float((x - r).abs().max() / (r.abs().max() + 1e-6)) for x, r in zip(got, refs))
    # A layout mistake is off by O(1); rounding is ~1e-6 in float32 and ~1e-2 in 16-bit floats.
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    return worst < tolerance, f"max relative logit difference {worst:.2e} (tolerance {tolerance:.0e})"
