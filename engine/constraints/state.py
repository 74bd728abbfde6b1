"""A compiled constraint and the per-request cursor the engine drives over it.

:class:`CompiledConstraint` (made by :class:`~engine.constraints.compiler.ConstraintCompiler`) is
shared between requests; ``new_state()`` gives the per-request :class:`ConstraintState` the
engine drives every step: ``mask_logits(row)`` before sampling, ``advance(token_id)`` after.

Masks: for every index state the engine visits, the set of allowed tokens is turned once into an
additive 0/-inf tensor on the logits' device and dtype (de-duplicated: all the "inside a JSON
string" states share one tensor; ~5 ms to build for 49k allowed tokens) and cached on the
CompiledConstraint, so the per-token hot path is two dict lookups, one add of the cached mask
(numpy on CPU, ``add_`` elsewhere) and one ``Index.get_next_state``. (outlines_core's
``Guide.write_mask_into`` + ``kernels.torch.apply_token_bitmask_inplace`` rebuild a bitmask every
step and the kernel goes through ``torch.compile``; the cached additive mask is cheaper here.)

Completeness: every regex is compiled as ``(regex)END`` with a sentinel pseudo-token (see
:data:`~engine.constraints.vocabulary.END`) because outlines_core 0.2.14 cannot leave a final
state through a non-final one; "complete" = "END could be consumed here".

tool_choice="auto": the state is free text (no mask) and watches the decoded bytes for the
family's trigger (``<tool_call>``; for llama3 a leading ``{`` or ``<|python_tag|>``). When it
appears -- as one token, spelled in pieces, or ending inside the last token -- the trigger and
whatever the last token added after it are walked through the index with single-byte tokens, and
from then on every token is constrained to the call body + closing tag (+ further calls, + EOS).
If that text cannot start a call (e.g. a token "> I" after "<tool_call"), the state stays free and
keeps watching.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .errors import ConstraintViolation
from .vocabulary import SENTINEL_ID, TokenVocab

__all__ = ["CompiledConstraint", "ConstraintState"]

_EOS_ONLY = -1  # mask-cache key: only EOS allowed
_MAX_MASK_BYTES = 64 << 20  # per compiled constraint and device/size/dtype; then start over


class CompiledConstraint:
    """Result of ConstraintCompiler.compile(), shared by requests: what it was compiled to does not
    change; its caches (masks, final states, token walks) fill as requests use it.

    mode: "full" (everything constrained), "triggered" (free text until a trigger, then
    constrained: tool_choice="auto"), or "free" (no constraint: tool_choice="none").
    """

    def __init__(
        self,
        *,
        kind: str,
        mode: str,
        vocab: TokenVocab,
        index=None,
        regex: str | None = None,
        max_calls: int | None = None,
        triggers: tuple[bytes, ...] = (),
        triggers_at_start_only: bool = False,
        trigger_token_ids: dict | None = None,
        tag_token_ids=(),
        family: str | None = None,
        tool_names: tuple[str, ...] = (),
        compile_seconds: float = 0.0,
    ):
        self.kind = kind
        self.mode = mode
        self.vocab = vocab
        self.index = index
        self.regex = regex
        self.max_calls = max_calls
        self.triggers = triggers
        self.triggers_at_start_only = triggers_at_start_only
        self.trigger_token_ids = trigger_token_ids or {}
        # special-flagged single-token call tags (e.g. <|python_tag|>): only allowed where
        # the call syntax is, never inside JSON strings (see allowed_token_ids)
        self.tag_token_ids = frozenset(tag_token_ids)
        self._probe = vocab.byte_token[ord("x")]
        self.family = family
        self.tool_names = tool_names
        self.compile_seconds = compile_seconds
        self.compile_stats: dict = {}  # worker timings / automaton size (probe_s, index_s, states)
        self.eos_token_ids = vocab.eos_token_ids
        self._eos_set = frozenset(vocab.eos_token_ids)
        self._oc_eos = vocab.eos_token_ids[0]
        self._initial = index.get_initial_state() if index is not None else None
        self._masks: dict = {}  # (device, size, dtype) -> {state key: 0/-inf tensor}
        self._by_sig: dict = {}  # (device, size, dtype) -> {allowed-set signature: tensor}
        self._final_cache: dict = {}
        self._walks: dict = {}
        self._mask_lock = threading.Lock()
        self._max_trigger = max((len(t) for t in triggers), default=0)

    def __repr__(self):
        return (
            f"CompiledConstraint(kind={self.kind!r}, mode={self.mode!r}, "
            f"family={self.family!r}, regex_len={len(self.regex or '')})"
        )

    def new_state(self) -> ConstraintState:
        return ConstraintState(self)

    # -- index helpers -------------------------------------------------------------
    def is_final(self, state: int) -> bool:
        """True when the output may end in this index state (the regex is matched)."""
        f = self._final_cache.get(state)
        if f is None:
            nxt = self.index.get_next_state(state, SENTINEL_ID)
            f = nxt is not None and bool(self.index.is_final_state(nxt))
            self._final_cache[state] = f
        return f

    def completions(self, state: int, token_id: int, end_state: int) -> int:
        """How many times the output becomes complete while ``token_id`` is consumed from
        ``state`` (a token can end one tool call and start the next: "}</tool_call><").
        Walks the token's bytes with single-byte tokens; cached per (state, token)."""
        key = (state, token_id)
        n = self._walks.get(key)
        if n is not None:
            return n
        start_final = self.is_final(state)
        tb = self.vocab.token_bytes[token_id] if token_id < self.vocab.size else None
        n = int(self.is_final(end_state) and not start_final)
        if tb and len(tb) > 1:
            bt = self.vocab.byte_token
            index = self.index
            cur, was, count = state, start_final, 0
            for b in tb:
                t = bt[b]
                cur = index.get_next_state(cur, t) if t is not None else None
                if cur is None:
                    break
                now = self.is_final(cur)
                count += int(now and not was)
                was = now
            else:
                n = count
        if len(self._walks) > 500_000:
            self._walks.clear()
        self._walks[key] = n
        return n

    def _allowed_array(self, state_key: int) -> np.ndarray:
        """Sorted int64 array of the token ids allowed in an index state (EOS ids
        included when the output is complete, or when no other token is allowed: the row
        must sample something, and advance() then raises ConstraintViolation)."""
        if state_key == _EOS_ONLY:
            return np.array(sorted(self.eos_token_ids), dtype=np.int64)
        ids = np.array(self.index.get_allowed_tokens(state_key), dtype=np.int64)
        drop = [self._oc_eos, SENTINEL_ID]
        if (
            self.tag_token_ids
            and self._probe is not None
            and self.index.get_next_state(state_key, self._probe) is not None
        ):
            # a letter fits here: free text (a JSON string), not a place for a tag token
            drop += list(self.tag_token_ids)
        ids = ids[~np.isin(ids, drop)]
        if self.is_final(state_key) or ids.size == 0:
            ids = np.concatenate([ids, np.array(self.eos_token_ids, dtype=np.int64)])
        ids.sort()
        return ids

    def allowed_token_ids(self, state_key: int) -> list[int]:
        """Token ids allowed in an index state (EOS ids included when complete)."""
        return self._allowed_array(state_key).tolist()

    def mask_for(self, state_key: int, device, size: int, dtype=torch.float32) -> torch.Tensor:
        """Additive mask [size] on ``device``: 0 where the token is allowed, -inf where
        not. (``row.add_(mask)`` is ~10x faster on CPU than ``masked_fill_`` with a bool
        mask -- 7 vs 70 us for 49k logits -- and one kernel on GPU as well.)"""
        dk = (device, size, dtype)
        cache = self._masks.get(dk)
        if cache is not None:
            m = cache.get(state_key)
            if m is not None:
                return m
        with self._mask_lock:
            cache = self._masks.setdefault(dk, {})
            sigs = self._by_sig.setdefault(dk, {})
            per_mask = size * torch.empty((), dtype=dtype).element_size()
            if len(sigs) * per_mask >= _MAX_MASK_BYTES:
                cache.clear()
                sigs.clear()
            arr = self._allowed_array(state_key)
            arr = arr[arr < size]
            sig = arr.tobytes()
            m = sigs.get(sig)
            if m is None:
                host = np.full(size, -np.inf, dtype=np.float32)
                host[arr] = 0.0
                m = torch.from_numpy(host).to(device=device, dtype=dtype)
                sigs[sig] = m
            cache[state_key] = m
            return m


class ConstraintState:
    """Per-request cursor over a CompiledConstraint.

    Engine protocol, every step: ``mask_logits(row)`` (in place, disallowed -> -inf)
    before sampling, then ``advance(token_id)`` with the sampled token. EOS is allowed
    exactly when the output is complete (``is_complete``).
    """

    __slots__ = ("c", "_state", "_final", "_calls", "_free", "_scan", "_tail", "_lead", "done", "triggered", "n_tokens")

    def __init__(self, compiled: CompiledConstraint):
        self.c = compiled
        self._calls = 0
        self._tail = b""
        self._lead = b""
        self.done = False  # EOS consumed
        self.triggered = False  # (triggered mode) the call part has started
        self.n_tokens = 0
        if compiled.mode == "full":
            self._free = False
            self._scan = False
            self._state = compiled._initial
            self._final = compiled.is_final(self._state)
        else:
            self._free = True
            self._scan = compiled.mode == "triggered"
            self._state = None
            self._final = False

    # -- properties ----------------------------------------------------------------
    @property
    def is_complete(self) -> bool:
        """True when stopping now leaves a complete, valid output."""
        return self.done or self._free or self._final

    @property
    def constrained(self) -> bool:
        """True while masks are applied (False in free text before a trigger)."""
        return not self._free

    @property
    def calls_completed(self) -> int:
        return self._calls

    def _state_key(self) -> int:
        c = self.c
        if self._final and c.max_calls is not None and self._calls >= c.max_calls:
            return _EOS_ONLY
        return self._state

    def allowed_token_ids(self) -> list[int] | None:
        """Allowed ids now (None = unconstrained). For tests / debugging."""
        if self._free or self.done:
            return None
        return self.c.allowed_token_ids(self._state_key())

    # -- hot path ------------------------------------------------------------------
    def mask_logits(self, logits_row: torch.Tensor) -> torch.Tensor:
        """Set disallowed entries of a 1-D logits row to -inf in place; returns it."""
        if self._free or self.done:
            return logits_row
        m = self.c.mask_for(self._state_key(), logits_row.device, logits_row.shape[-1], logits_row.dtype)
        if logits_row.is_cpu and logits_row.dtype == torch.float32 and not logits_row.requires_grad:
            # numpy's add is single-threaded: torch's add_ on >32k elements goes through the
            # intra-op thread pool, which costs ms instead of us when CPUs are contended
            a = logits_row.numpy()
            np.add(a, m.numpy(), out=a)
        else:
            logits_row.add_(m)
        return logits_row

    def advance(self, token_id: int) -> None:
        """Consume the sampled token."""
        token_id = int(token_id)
        self.n_tokens += 1
        c = self.c
        if self.done:
            return
        if token_id in c._eos_set:
            if self._free or self._final:
                self.done = True
                return
            raise ConstraintViolation("EOS sampled before the constrained output was complete")
        if self._free:
            if self._scan:
                self._scan_trigger(token_id)
            return
        if self._final and c.max_calls is not None and self._calls >= c.max_calls:
            raise ConstraintViolation(f"token {token_id} after the last allowed tool call")
        nxt = c.index.get_next_state(self._state, token_id) if token_id != SENTINEL_ID else None
        if nxt is None:
            raise ConstraintViolation(f"token {token_id} not allowed by the constraint")
        if c.max_calls is not None:
            self._calls += c.completions(self._state, token_id, nxt)
        self._state = nxt
        self._final = c.is_final(nxt)

    # -- triggered (tool_choice="auto") --------------------------------------------
    def _scan_trigger(self, token_id: int) -> None:
        c = self.c
        tb = c.vocab.token_bytes[token_id] if token_id < c.vocab.size else None
        if not tb:
            return
        if c.triggers_at_start_only:
            lead = self._lead + tb
            s = lead.lstrip(b" \t\r\n")
            if not s:
                self._lead = lead
                return
            for trig in c.triggers:
                if s.startswith(trig):
                    self._scan = False
                    self._lead = b""
                    self._enter(s, trig)
                    return
            if any(trig.startswith(s) for trig in c.triggers):
                self._lead = lead  # undecided ("<|py...")
                return
            self._scan = False  # the reply is plain text: stop looking
            self._lead = b""
            return
        buf = self._tail + tb
        while True:
            pos, trig = -1, None
            for t in c.triggers:
                j = buf.find(t)
                if j >= 0 and (pos < 0 or j < pos):
                    pos, trig = j, t
            if trig is None:
                keep = c._max_trigger - 1
                self._tail = buf[-keep:] if keep > 0 else b""
                return
            if self._enter(buf[pos:], trig):
                self._tail = b""
                return
            buf = buf[pos + 1 :]  # not a valid call start: keep looking

    def _enter(self, text: bytes, trig: bytes) -> bool:
        """Walk the index over ``text`` (trigger + any overshoot of the last token)."""
        c = self.c
        index = c.index
        state = c._initial
        rest = text
        tid = c.trigger_token_ids.get(trig)
        if tid is not None:
            nxt = index.get_next_state(state, tid)
            if nxt is not None:
                state, rest = nxt, text[len(trig) :]
        bt = c.vocab.byte_token
        for b in rest:
            t = bt[b]
            nxt = index.get_next_state(state, t) if t is not None else None
            if nxt is None:
                return False
            state = nxt
        self._state = state
        self._final = c.is_final(state)
        self._calls = 1 if self._final else 0
        self._free = False
        self.triggered = True
        return True
