"""One forward per engine step over the KV pool: every decoding row's next token and newcomers'
prompt chunks, packed into a single sequence.

The model runs on ``[1, N]`` tokens: first one token for each decoding row, then the prompt chunks
of the sequences being prefilled. Everything that works per token (embeddings, RoPE from per-token
position ids, linear layers, norms) runs on all N at once, so a newcomer's prefill shares the
decode step's matrix multiplications. Only attention cares which sequence a token belongs to:

* ``PagedStep`` is passed to the model as its cache. Its ``update()`` scatters the step's new keys
  and values into the pool (engine/kv_cache.py) at the step's slot mapping: one ``index_copy_`` per
  layer, never a copy of the cache.
* ``paged_attention`` is registered with transformers' ``AttentionInterface``. Decode rows attend
  together: on CUDA through the Triton kernel that reads the pool through block tables
  (engine/triton_attention.py), elsewhere in one SDPA call over keys and values gathered through
  each row's block table, padding masked. Prompt chunks that start their sequence attend causally
  over their own fresh keys, all of them in one padded SDPA call; a continuation chunk attends
  over everything of its sequence gathered from the pool. Sliding-window layers (the model
  passes ``sliding_window`` to its attention function) get the window in their masks, and models
  whose image tokens attend to each other both ways (Gemma 3) get each image's block in them.

A model spread over several GPUs (``device_map``) runs its layers one device after another, each
with its KV in the pool on its own device: the step's metadata is built once on the first device
and copied to each other device the first time one of its layers asks (``PagedStep.on``).

A 4-D placeholder attention mask makes transformers skip building masks of its own. ``install()``
switches a model to this attention only if a self-test (two sequences over two packed steps,
against plain forwards) gives the same logits; otherwise the engine keeps its fallback path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .kv_cache import KVPool

log = logging.getLogger("chatserve.engine")

NAME = "chatserve_paged"
_placeholder_masks: dict[str, torch.Tensor] = {}


def slots(table: torch.Tensor, start: int, end: int, block_size: int) -> torch.Tensor:
    """Pool slots of token positions [start, end) of a sequence whose block table is ``table``."""
    pos = torch.arange(start, end, device=table.device)
    return table[pos // block_size] * block_size + pos % block_size


def row_slot_mapping(rows: list[tuple[list[int], int]], block_size: int) -> list[int]:
    """The pool slot of each decoding row's new token (the last of its ``length`` positions)."""
    return [table[(length - 1) // block_size] * block_size + (length - 1) % block_size for table, length in rows]


def use_kernel(device) -> bool:
    """Decode rows attend through the Triton kernel (CUDA) rather than gather + SDPA.
    CHATSERVE_TRITON_DECODE=1 uses it off CUDA too (with TRITON_INTERPRET=1: the tests' CPU runs)."""
    on = torch.device(device).type == "cuda" or os.environ.get("CHATSERVE_TRITON_DECODE") == "1"
    return on and _triton() is not None


def decode_splits(rows: int, kv_heads: int, device) -> int:
    """The kernel's context splits for a step of ``rows`` decode rows: a function of the CUDA-graph
    bucket the row count falls in, so eager steps and graph replays of one bucket compute alike."""
    from .cuda_graphs import bucket_for

    return _triton().splits_for(bucket_for(rows), kv_heads, device)


_TRITON: list = []


def _triton():
    if not _TRITON:
        try:
            from . import triton_attention

            _TRITON.append(triton_attention)
        except Exception as exc:  # no triton (or no working compiler): gather + SDPA everywhere
            log.warning(
                "Triton paged attention unavailable (%s: %s); decode attention gathers instead", type(exc).__name__, exc
            )
            _TRITON.append(None)
    return _TRITON[0]


@dataclass
class Segment:
    """A prompt chunk in the step: ``n`` tokens after ``past`` already in the pool."""

    offset: int  # where the chunk starts in the packed sequence
    past: int
    n: int
    context: torch.Tensor | None  # slots of positions [0, past + n) when past > 0
    # images whose tokens attend to each other both ways (Gemma 3): [start, end) positions, the
    # chunk holding each whole (Sequence.whole_images) or its end after earlier tokens of it
    runs: tuple = ()


def _attend(q: torch.Tensor, k: torch.Tensor, window: int | None, runs) -> torch.Tensor:
    """True where query position q may attend to key position k: causal, or both inside the same
    image of ``runs``; then within the sliding window (the model's own order: window AND (causal OR
    image))."""
    allowed = k <= q
    for a, b in runs:
        allowed = allowed | ((q >= a) & (q < b) & (k >= a) & (k < b))
    if window is not None:
        allowed = allowed & (k > q - window)
    return allowed


class _FreshBatch:
    """Fresh prompt chunks padded to the longest: query/key row j of chunk i is packed position
    ``index[i, j]`` (the chunk's last token repeated past its end); ``keep`` picks the real rows of
    the flattened output, chunk after chunk."""

    def __init__(self, segments: list[Segment], members: list[int], device):
        self.members = members
        self.sizes = [segments[i].n for i in members]
        width = max(self.sizes)
        pos = torch.arange(width, device=device)
        sizes = torch.tensor(self.sizes, device=device)
        offsets = torch.tensor([segments[i].offset for i in members], device=device)
        self.index = offsets[:, None] + torch.minimum(pos[None, :], sizes[:, None] - 1)
        self.valid = pos[None, :] < sizes[:, None]  # [k, width]
        self.keep = self.valid.reshape(-1).nonzero().squeeze(1)
        self.pos = pos
        self.runs = [segments[i].runs for i in members]
        self._masks: dict = {}

    def mask(self, window: int | None) -> torch.Tensor:
        if window not in self._masks:
            q, k = self.pos[:, None], self.pos[None, :]
            if any(self.runs):  # a chunk's images differ: a mask of its own each
                allowed = torch.stack([_attend(q, k, window, runs) for runs in self.runs])
            else:
                allowed = _attend(q, k, window, ())[None]
            self._masks[window] = (allowed & self.valid[:, None, :])[:, None]  # [k, 1, width, width]
        return self._masks[window]


class _LayerRef:
    """What PagedStep.update returns in place of key/value tensors: the step and the layer index."""

    __slots__ = ("step", "layer")

    def __init__(self, step: PagedStep, layer: int):
        self.step, self.layer = step, layer


class PagedStep:
    """The layout of one packed forward, passed to the model as its cache."""

    is_compileable = False

    def __init__(
        self,
        pool: KVPool,
        slot_mapping: torch.Tensor,
        rows: int,
        row_slots: torch.Tensor | None,
        row_lengths: torch.Tensor | None,
        segments: list[Segment],
        tables: torch.Tensor | None = None,
        splits: int = 0,
    ):
        self.pool = pool
        self.slot_mapping = slot_mapping  # [N]: where each token's keys/values go
        self.rows = rows
        self.row_slots = row_slots  # [rows, T]: every row's context, padded with null slots (gather path)
        self.row_lengths = row_lengths  # [rows]
        self.tables = tables  # [rows, W] block tables (kernel path: CUDA)
        self.splits = splits  # the kernel's context splits (engine/triton_attention.py)
        self.min_len = self.max_len = 0  # shortest / longest row context (Python ints: no device sync)
        self.segments = segments
        # the last layer's new keys and values (its attention comes next), and those of layers whose
        # keys and values later layers reuse (Gemma 4's KV sharing: those layers attend with them)
        self._fresh: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._masks: dict = {}
        self._copies: dict[torch.device, PagedStep] = {}  # this step's metadata on other devices

    def on(self, device: torch.device) -> PagedStep:
        """This step's metadata on ``device``: the step itself on the device it was built on, else
        a copy made the first time a layer on that device asks (a model spread over several GPUs).
        A copy makes its masks on its own device, once per step like the step's."""
        if device == self.slot_mapping.device:
            return self
        copy = self._copies.get(device)
        if copy is None:

            def to(t):
                return None if t is None else t.to(device)

            segments = [Segment(s.offset, s.past, s.n, to(s.context), s.runs) for s in self.segments]
            copy = PagedStep(
                self.pool,
                to(self.slot_mapping),
                self.rows,
                to(self.row_slots),
                to(self.row_lengths),
                segments,
                to(self.tables),
                self.splits,
            )
            copy.min_len, copy.max_len = self.min_len, self.max_len
            self._copies[device] = copy
        return copy

    @classmethod
    def build(
        cls, pool: KVPool, rows: list[tuple[list[int], int]], chunks: list[tuple[list[int], int, int]], device
    ) -> PagedStep:
        """rows: (block table, context length incl. this step's token); chunks: (block table, past, n)
        or (block table, past, n, image runs) (Segment.runs)."""
        bs = pool.block_size
        mapping: list[int] = []
        row_slots = row_lengths = tables = None
        splits = 0
        if rows:
            mapping = row_slot_mapping(rows, bs)
            width = max(len(t) for t, _ in rows)
            lengths = [n for _, n in rows]
            if use_kernel(device):
                tables = torch.tensor([t + [0] * (width - len(t)) for t, _ in rows], dtype=torch.int32, device=device)
                row_lengths = torch.tensor(lengths, dtype=torch.int32, device=device)
                splits = decode_splits(len(rows), pool.shape.kv_heads, device)
            else:
                table_t = torch.tensor([t + [0] * (width - len(t)) for t, _ in rows], dtype=torch.long, device=device)
                row_lengths = torch.tensor(lengths, dtype=torch.long, device=device)
                pos = torch.arange(max(lengths), device=device)
                row_slots = table_t[:, pos // bs] * bs + pos % bs
                if min(lengths) != max(lengths):
                    row_slots = row_slots.masked_fill(pos[None, :] >= row_lengths[:, None], 0)  # null slots
        segments = []
        offset = len(rows)
        parts = [torch.tensor(mapping, dtype=torch.long, device=device)] if rows else []
        for table, past, n, *runs in chunks:
            t = torch.tensor(table, dtype=torch.long, device=device)
            context = slots(t, 0, past + n, bs) if past else None
            parts.append(context[past:] if past else slots(t, 0, n, bs))
            segments.append(Segment(offset, past, n, context, tuple(runs[0]) if runs else ()))
            offset += n
        mapping_t = parts[0] if len(parts) == 1 else torch.cat(parts)
        step = cls(pool, mapping_t, len(rows), row_slots, row_lengths, segments, tables, splits)
        if rows:
            step.min_len, step.max_len = min(lengths), max(lengths)
        return step

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        # [1, H, N, D] -> [N, H, D] into the pool (this layer's part of it is on the layer's device)
        mapping = self.on(key_states.device).slot_mapping
        self.pool.write(layer_idx, mapping, key_states[0].transpose(0, 1), value_states[0].transpose(0, 1))
        self._fresh = (layer_idx, key_states, value_states)
        if layer_idx in self.pool.shape.stores:
            self._kept[layer_idx] = (key_states, value_states)
        ref = _LayerRef(self, layer_idx)
        return ref, ref

    # masks (True = attend), made once per step and window, shared by every layer
    def row_mask(self, window: int | None) -> torch.Tensor | None:
        key = ("rows", window)
        if key not in self._masks:
            lengths = self.row_lengths
            pos = torch.arange(self.max_len, device=lengths.device)[None, :]
            mask = None
            if self.min_len != self.max_len:
                mask = pos < lengths[:, None]
            if window is not None and self.max_len > window:
                inside = pos > (lengths[:, None] - 1 - window)
                mask = inside if mask is None else mask & inside
            self._masks[key] = None if mask is None else mask[:, None, None, :]
        return self._masks[key]

    def segment_mask(self, seg: Segment, window: int | None, device) -> torch.Tensor | None:
        if seg.past == 0 and (window is None or seg.n <= window) and not seg.runs:
            return None  # plain causal over the chunk's own keys
        key = (seg.past, seg.n, window, seg.runs)
        if key not in self._masks:
            q = torch.arange(seg.past, seg.past + seg.n, device=device)[:, None]
            k = torch.arange(seg.past + seg.n, device=device)[None, :]
            self._masks[key] = _attend(q, k, window, seg.runs)[None, None]
        return self._masks[key]

    def fresh_batch(self) -> _FreshBatch | None:
        """The step's prompt chunks that start their sequences, when there are several (made once per step)."""
        if "fresh" not in self._masks:
            members = [i for i, seg in enumerate(self.segments) if seg.context is None]
            self._masks["fresh"] = (
                _FreshBatch(self.segments, members, self.slot_mapping.device) if len(members) > 1 else None
            )
        return self._masks["fresh"]

    # transformers asks a few things of the object passed as the cache
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def paged_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    if not isinstance(key, _LayerRef):  # not a paged step (e.g. a plain forward): transformers' SDPA
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("softcap") is not None:
        raise ValueError("paged attention does not implement logit soft-capping")
    step, li = key.step, key.layer
    # this layer's new keys and values (or, for a layer that reuses another's, that layer's)
    fresh_k, fresh_v = step._fresh[1:] if step._fresh[0] == li else step._kept[li]
    step = step.on(query.device)  # the step's metadata on this layer's device
    window = kwargs.get("sliding_window")
    parts = []
    rows = step.rows
    if rows and step.tables is not None:  # CUDA: straight from the pool
        q = query[0, :, :rows].transpose(0, 1)  # [rows, Hq, D]
        parts.append(
            _triton().paged_decode(
                q,
                step.pool.keys[li],
                step.pool.values[li],
                step.tables,
                step.row_lengths,
                step.pool.block_size,
                scaling if scaling is not None else q.shape[-1] ** -0.5,
                window,
                step.splits,
            )
        )
    elif rows:
        k, v = step.pool.gather(li, step.row_slots)  # [rows, T, H, D]
        q = query[0, :, :rows].transpose(0, 1).unsqueeze(2)  # [rows, Hq, 1, D]
        out, _ = sdpa_attention_forward(
            module, q, k.transpose(1, 2), v.transpose(1, 2), step.row_mask(window), scaling=scaling, is_causal=False
        )
        parts.append(out.reshape(rows, *out.shape[2:]))  # [rows, Hq, D]
    if not step.segments:
        return parts[0].unsqueeze(0), None
    batched = step.fresh_batch()
    if batched is not None:  # every chunk that starts its sequence, in one padded SDPA call
        index = batched.index  # [k, width] packed positions
        q = query[0][:, index].transpose(0, 1)  # [k, Hq, width, D]
        k, v = fresh_k[0][:, index].transpose(0, 1), fresh_v[0][:, index].transpose(0, 1)
        out, _ = sdpa_attention_forward(module, q, k, v, batched.mask(window), scaling=scaling, is_causal=False)
        pieces = dict(zip(batched.members, out.reshape(-1, *out.shape[2:])[batched.keep].split(batched.sizes)))
    for i, seg in enumerate(step.segments):
        if batched is not None and i in pieces:
            parts.append(pieces[i])
            continue
        q = query[:, :, seg.offset : seg.offset + seg.n]
        if seg.context is None:
            k = fresh_k[:, :, seg.offset : seg.offset + seg.n]
            v = fresh_v[:, :, seg.offset : seg.offset + seg.n]
        else:
            k, v = step.pool.gather(li, seg.context)  # [past + n, H, D]
            k, v = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        mask = step.segment_mask(seg, window, query.device)
        out, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=scaling, is_causal=mask is None)
        parts.append(out[0])  # [n, Hq, D]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return out.unsqueeze(0), None  # [1, N, Hq, D]


AttentionInterface.register(NAME, paged_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def forward(
    model,
    cache_kw: str,
    tokens: list[int],
    positions: list[int] | torch.Tensor,
    step: PagedStep,
    keep: list[int],
    device,
    images: tuple[list[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run one packed step; returns float logits at the packed indices ``keep`` ([len(keep), V]).

    ``images``: (packed indices of image placeholder tokens, their embeddings from the vision
    encoder): the step then runs on input embeddings with those rows replaced, as the model's own
    forward merges image features, but for any slice of a prompt's image tokens.
    """
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    if isinstance(positions, torch.Tensor):  # [axes, N] (multimodal rotary positions)
        pos = positions.unsqueeze(1)
    else:
        pos = torch.tensor([positions], dtype=torch.long, device=device)
    mask = _placeholder_masks.get(str(device))
    if mask is None:  # made once per device, not copied to it every step
        mask = _placeholder_masks[str(device)] = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
    inputs = {"input_ids": ids}
    if images is not None:
        inputs = _merged_inputs(model, ids, *images)
    # a model spread over GPUs (device_map) ends on whichever holds its last layers: a CPU index
    # serves any device
    hf_map = getattr(model, "hf_device_map", None) or {}
    keep_on = "cpu" if len(set(map(str, hf_map.values()))) > 1 else device
    out = model(
        **inputs,
        position_ids=pos,
        attention_mask=mask,
        use_cache=True,
        logits_to_keep=torch.tensor(keep, dtype=torch.long, device=keep_on),
        **{cache_kw: step},
    )
    return out.logits[0].float()


def _merged_inputs(model, ids: torch.Tensor, at: list[int], rows: torch.Tensor) -> dict:
    """The step's input embeddings with the images' rows in place of their placeholders.

    Models with per-layer token embeddings (Gemma 4) look those up by token id, which merged
    embeddings no longer carry, so they are passed too, made as the model's own forward makes them:
    every image, video and audio placeholder token counts as padding there, in both tables (a
    generated placeholder token included; steps without images take the model's own path)."""
    text = getattr(getattr(model, "model", None), "language_model", None)
    per_layer = getattr(text, "hidden_size_per_layer_input", None) and hasattr(text, "get_per_layer_inputs")
    if per_layer:
        cfg = model.config
        ids = ids.clone()
        for name in ("image_token_id", "video_token_id", "audio_token_id"):
            placeholder = getattr(cfg, name, None)
            if placeholder is not None:
                ids[ids == placeholder] = cfg.get_text_config().pad_token_id
    embeds = model.get_input_embeddings()(ids)
    embeds[0, torch.tensor(at, dtype=torch.long, device=ids.device)] = rows.to(embeds.dtype)
    if per_layer:
        return {"inputs_embeds": embeds, "per_layer_inputs": text.get_per_layer_inputs(ids, None)}
    return {"inputs_embeds": embeds}


def install(model, cache_kw: str, device, layer_devices: list | None = None) -> bool:
    """Switch the model's attention to paged_attention if it gives the same logits; False if not.
    ``layer_devices``: each layer's device, for a model spread over several (default: ``device``)."""
    original = model.config._attn_implementation
    if original not in ("sdpa", NAME):
        log.info("paged steps off: the model uses %s attention, not sdpa", original)
        return False
    cfg = model.config
    layer_types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if not layer_types <= {"full_attention", "sliding_attention"}:
        log.info("paged steps off: the model has non-attention layers (%s)", sorted(layer_types))
        return False

    def attempt():
        try:
            return _self_test(model, cache_kw, device, layer_devices)
        except Exception as exc:  # an architecture that does not fit: keep the fallback path
            return False, f"{type(exc).__name__}: {exc}"

    model.set_attn_implementation(NAME)
    ok, err = attempt()
    if not ok and use_kernel(device):  # the Triton kernel at fault? decode rows can gather instead
        log.warning("paged self-test failed with the Triton decode kernel (%s); trying without it", err)
        _TRITON[:] = [None]
        ok, err = attempt()
    if not ok:
        log.warning("paged steps off for this model (self-test: %s); using the fallback path", err)
        model.set_attn_implementation(original)
    return ok


def _self_test(model, cache_kw: str, device, layer_devices: list | None = None) -> tuple[bool, str]:
    """Two sequences through two packed steps (a fresh prompt, a chunk continuation across a block
    boundary, a decode row beside it) against plain forwards of the same tokens."""
    from .kv_cache import PoolShape

    vocab = model.get_output_embeddings().weight.shape[0]
    a = [(7 * i + 3) % vocab for i in range(7)]
    b = [(11 * i + 5) % vocab for i in range(5)]
    pool = KVPool(PoolShape.of(model), num_blocks=6, block_size=4, device=layer_devices or device)
    ta, tb = [1, 2], [3, 4]
    with torch.inference_mode():

        def plain(ids):
            return model(input_ids=torch.tensor([ids], device=device), logits_to_keep=1).logits[0, -1].float()

        # step 1: prompt a[:6] whole, prompt b in a first chunk of 2 tokens
        step = PagedStep.build(pool, [], [(ta, 0, 6), (tb, 0, 2)], device)
        first = forward(model, cache_kw, a[:6] + b[:2], list(range(6)) + [0, 1], step, [5], device)
        # step 2: a decodes a[6] (a row of 7 tokens), b's second chunk b[2:5] (past 2)
        step = PagedStep.build(pool, [(ta, 7)], [(tb, 2, 3)], device)
        second = forward(model, cache_kw, [a[6]] + b[2:5], [6, 2, 3, 4], step, [0, 3], device)
        refs = [plain(a[:6]), plain(a), plain(b)]
        got = [first[0], second[0], second[1]]
    worst = max(float((x - r).abs().max() / (r.abs().max() + 1e-6)) for x, r in zip(got, refs))
    # A layout mistake is off by O(1); rounding is ~1e-6 in float32 and ~1e-2 in 16-bit floats.
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    return worst < tolerance, f"max relative logit difference {worst:.2e} (tolerance {tolerance:.0e})"
