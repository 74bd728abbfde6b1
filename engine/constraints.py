"""Constrained decoding: JSON object / JSON schema / tool calls, on outlines_core.

Pieces:

* :func:`get_token_vocab` -- the tokenizer's vocabulary as *bytes*, built once per
  tokenizer (cached), with every special token left out of what the constraints may
  generate (EOS is handled separately as the only terminator).
* :class:`ConstraintCompiler` -- one per model/tokenizer. ``compile(spec)`` turns a
  :class:`~engine.request.ConstraintSpec` into a :class:`CompiledConstraint` (regex ->
  outlines_core ``Index``), with an LRU cache, a complexity budget and a compile timeout;
  the regex and the Index are built in a worker process (:mod:`engine.compile_worker`).
* :class:`CompiledConstraint` -- shareable between requests; ``new_state()`` gives the
  per-request :class:`ConstraintState` the engine drives every step:
  ``mask_logits(row)`` before sampling, ``advance(token_id)`` after.

Vocabulary: token ids -> the exact bytes they add to the text (byte-level BPE: the
GPT-2 byte alphabet mapped back; sentencepiece: "\u2581" -> space and <0xXX> -> byte;
added tokens: their content). Special tokens -- ``all_special_ids`` plus every added
token flagged ``special`` (SmolLM2 has 17, only 3 of them in ``all_special_ids``) -- and
all EOS ids are left out of the outlines vocabulary, so they can never be generated
inside a constrained output; EOS is allowed by the mask exactly when the output is
complete. (Exception, tools only: a family's call tag that is a special token, e.g.
``<|python_tag|>``, is allowed at the tag positions, never inside JSON strings.)

Masks: for every index state the engine visits, the set of allowed tokens is turned
once into an additive 0/-inf tensor on the logits' device and dtype (de-duplicated: all
the "inside a JSON string" states share one tensor; ~5 ms to build for 49k allowed
tokens) and cached on the CompiledConstraint, so the per-token hot path is two dict
lookups, one add of the cached mask (numpy on CPU, ``add_`` elsewhere) and one
``Index.get_next_state``. (outlines_core's ``Guide.write_mask_into`` +
``kernels.torch.apply_token_bitmask_inplace`` rebuild a bitmask every step and the
kernel goes through ``torch.compile``; the cached additive mask is cheaper here.)

Completeness: every regex is compiled as ``(regex)END`` with a sentinel pseudo-token
(see ``_END``) because outlines_core 0.2.14 cannot leave a final state through a
non-final one; "complete" = "END could be consumed here".

Limits (:class:`ConstraintLimits`; ``chatserve serve`` flags in brackets). A client's schema or
tool set is compiled in a worker process, never in the server process, and is refused with
ConstraintTooComplex (HTTP 400 ``schema_too_complex``, naming the limit) when it passes one of:

* regex length [``--max-constraint-regex``, default 100,000 characters]: checked as soon as
  outlines has written the regex (milliseconds), before any automaton is built. This is what
  objects without required properties hit: outlines writes one alternative per property for
  them, so their regex grows with the square of the property count, and building its automaton
  dominates (50 optional properties: 92,283 characters, ~2.5 s; 150: 825,505 characters, 5-7 s
  in the issue's report, 35 s on a shared 2-core machine; 300: 3.3 M characters). The message
  names the object with the most optional properties.
* automaton states [``--max-constraint-states``, default 500,000,000 / vocabulary size: 10,172
  for a 49,152-token vocabulary, 3,898 for 128,256]: counted on an Index built with single-byte
  tokens (milliseconds for ordinary schemas, ~0.7 s at the regex limit); building the real Index
  walks the whole vocabulary from every state, ~0.25-0.6 ms per state at 49k tokens on one
  core, so the default stops compiles of more than ~3-6 s. Long maxLength / maxItems, big
  enums and many properties or tools are what add states (40 tools of 6 parameters: 5,568).
* token transitions [``--max-constraint-transitions``, default 10,000,000, estimated from the
  same probe]: a state inside a string allows nearly every token, and the server keeps every
  transition of a cached constraint (~12 bytes each): three strings of maxLength 200 make
  ~30 M transitions, ~360 MB and ~6 s; three of maxLength 60, ~8.9 M, are accepted.
* time [``--compile-timeout``, default 10 s, the ``timeout`` argument of compile()]: the worker
  is killed (SIGKILL) when it runs out; its CPU and memory are released at once.
* memory [``--compile-memory-gb``, default 4]: each worker's address-space limit; a compile
  that needs more fails its allocation and ends the worker (reported as too complex).
* concurrency [``--compile-workers``, default 2]: compiles running at once, one core each;
  others wait for a worker within their own timeout (429 ``compiler_busy`` when none frees).

response_format json_object uses the server's fixed regex: no budget, and its compile is never
killed (a caller whose timeout passes first gets ConstraintBusy, 429, and the result is cached
for the retry); ``chatserve serve`` compiles it at start-up (``prewarm``).
Compiled constraints are cached (LRU of 64), so a schema is compiled once per server.

tool_choice="auto": the state is free text (no mask) and watches the decoded bytes for
the family's trigger (``<tool_call>``; for llama3 a leading ``{`` or ``<|python_tag|>``).
When it appears -- as one token, spelled in pieces, or ending inside the last token --
the trigger and whatever the last token added after it are walked through the index
with single-byte tokens, and from then on every token is constrained to the call body
+ closing tag (+ further calls, + EOS). If that text cannot start a call (e.g. a token
"> I" after "<tool_call"), the state stays free and keeps watching.
"""
from __future__ import annotations

import concurrent.futures
import json
import math
import pickle
import re
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.compile_worker import (CompilePool, CompilerBusy, CompilerUnavailable, CompileTimeout, WorkerDied,
                                   default_pool)
from engine.detokenize import byte_decoder
from engine.request import ConstraintSpec
from engine.tools import FAMILIES, detect_family, get_format, normalize_tools

__all__ = [
    "ConstraintError", "ConstraintTooComplex", "ConstraintBusy", "ConstraintViolation", "TokenVocab",
    "get_token_vocab", "ConstraintLimits", "ConstraintCompiler", "CompiledConstraint", "ConstraintState",
    "DEFAULT_WHITESPACE", "build_json_object_regex",
]

DEFAULT_WHITESPACE = r"[ ]?"   # at most one space between JSON tokens (no whitespace loops)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------

class ConstraintError(ValueError):
    """The constraint cannot be compiled; ``str(e)`` is meant for a 400 response."""

    too_complex = False


class ConstraintTooComplex(ConstraintError):
    """The constraint is over a complexity limit, or its compilation did not finish within the
    timeout or the worker's memory limit (``too_complex`` is True)."""

    too_complex = True


class ConstraintBusy(ConstraintTooComplex):
    """No compile worker came free within the timeout (the compiler is overloaded: retry after
    ``retry_after`` seconds). A ConstraintTooComplex for callers that do not tell the two apart."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class ConstraintViolation(RuntimeError):
    """advance() got a token the mask did not allow (an engine bug, not a client error)."""


# ---------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------

_UNICODE_TO_BYTE = byte_decoder()   # GPT-2 byte-level BPE: printable char -> byte

# END sentinel. outlines_core 0.2.14's Index only keeps, out of a *final* state, the
# tokens whose walk ends in a final state again: with regex "(ab)+", after "ab" the
# token "a" is missing (only "ab" is allowed), so a second tool call, "1.5" after a
# top-level "1", etc. could never be generated. Every regex is therefore compiled as
# "<regex>END", where END is one private-use character spelled only by a pseudo-token
# (SENTINEL_ID, never sampled, filtered out of every mask): no real state is final, and
# "complete" means "the sentinel could be consumed here".
_END = "\U0010FFFD"
SENTINEL_ID = 2**31 - 3
# What constrained output cannot contain: END itself, and every other code point whose UTF-8
# starts with 0xF4 (no real token may hold that byte, see TokenVocab.outlines_vocabulary).
_UNREPRESENTABLE = re.compile("[\U00100000-\U0010FFFF]")
_SPIECE = "\u2581"
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _decoder_kind(tokenizer) -> str:
    """'bytelevel' | 'sentencepiece' | 'other', from the fast tokenizer's decoder."""
    bt = getattr(tokenizer, "backend_tokenizer", None)
    dec = getattr(bt, "decoder", None) if bt is not None else None
    if dec is None:
        return "sentencepiece" if hasattr(tokenizer, "sp_model") else "other"
    try:
        desc = json.loads(dec.__getstate__())
    except Exception:
        desc = {"type": type(dec).__name__}

    def kinds(d):
        yield d.get("type")
        for sub in d.get("decoders") or []:
            yield from kinds(sub)
        pat = d.get("pattern")
        if isinstance(pat, dict) and pat.get("String") == _SPIECE:
            yield "Replace\u2581"

    ks = set(kinds(desc))
    if "ByteLevel" in ks:
        return "bytelevel"
    if ks & {"Metaspace", "ByteFallback", "Replace\u2581"}:
        return "sentencepiece"
    return "other"


@dataclass
class TokenVocab:
    """A tokenizer's vocabulary as bytes, built once per tokenizer (see get_token_vocab).

    token_bytes[id]: the bytes a token contributes to the text (special tokens: their
      content, so free-text trigger detection can see them; None for unknown ids).
    special_ids: ids never produced inside a constraint (all special / added-special
      tokens and all EOS ids).
    base_map: bytes -> ids for every other token (the outlines_core vocabulary).
    byte_token[b]: a non-special token id whose text is exactly the single byte b.
    """
    eos_token_ids: tuple[int, ...]
    token_bytes: list
    special_ids: frozenset
    base_map: dict
    byte_token: list
    decoder_kind: str
    uid: str = field(default_factory=lambda: uuid.uuid4().hex, repr=False)
    _oc_vocabs: dict = field(default_factory=dict, repr=False)
    _payloads: dict = field(default_factory=dict, repr=False)
    _text_ids: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def size(self) -> int:
        return len(self.token_bytes)

    def token_id_for_text(self, text: str) -> int | None:
        """Id of a single token whose text is exactly ``text`` (special or not)."""
        want = text.encode("utf-8")
        with self._lock:
            if want not in self._text_ids:
                self._text_ids[want] = next(
                    (i for i, b in enumerate(self.token_bytes) if b == want), None)
            return self._text_ids[want]

    def outlines_vocabulary(self, extra_ids: tuple[int, ...] = ()):
        """outlines_core.Vocabulary of the non-special tokens (+ ``extra_ids``) and the
        END sentinel pseudo-token (see ``_END``), cached.

        Tokens containing the byte 0xF4 are left out so that nothing but the sentinel
        can spell END (0xF4 only starts code points U+100000..U+10FFFF, the
        supplementary private use area B, which constrained output therefore cannot
        contain)."""
        import outlines_core as oc
        key = tuple(sorted(set(extra_ids)))
        with self._lock:
            v = self._oc_vocabs.get(key)
            if v is None:
                m = {k: list(ids) for k, ids in self.base_map.items() if b"\xf4" not in k}
                for i in key:
                    b = self.token_bytes[i]
                    if b and b"\xf4" not in b:
                        m.setdefault(b, []).append(i)
                m[_END.encode("utf-8")] = [SENTINEL_ID]
                v = oc.Vocabulary(self.eos_token_ids[0], m)
                self._oc_vocabs[key] = v
            return v

    def outlines_payload(self, extra_ids: tuple[int, ...] = ()):
        """(key, function returning the pickled outlines_vocabulary(extra_ids)): what a compile
        worker needs to load this vocabulary (~0.6 MB for 49k tokens, pickled once)."""
        key = tuple(sorted(set(extra_ids)))

        def payload() -> bytes:
            p = self._payloads.get(key)
            if p is None:
                p = pickle.dumps(self.outlines_vocabulary(key))
                with self._lock:
                    self._payloads[key] = p
            return p
        return f"{self.uid}:{','.join(map(str, key))}", payload


_VOCAB_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_VOCAB_CACHE_LOCK = threading.Lock()


def _build_token_vocab(tokenizer, eos_ids: tuple[int, ...]) -> TokenVocab:
    vocab: dict[str, int] = tokenizer.get_vocab()
    added = {}
    for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        added[int(i)] = t
    special = set(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []))
    special |= {i for i, t in added.items() if getattr(t, "special", False)}
    special |= set(eos_ids)
    size = max(max(vocab.values(), default=-1), max(added, default=-1)) + 1
    kind = _decoder_kind(tokenizer)

    def legacy(tok: str) -> bytes:
        s = tokenizer.convert_tokens_to_string([tok])
        if tok.startswith(_SPIECE) or tok == "<0x20>":
            s = " " + s.lstrip(" ") if not s.startswith(" ") else s
        if "\ufffd" in s:
            m = _BYTE_TOKEN.match(tok)
            if m:
                return bytes([int(m.group(1), 16)])
            bs = [_UNICODE_TO_BYTE.get(c) for c in tok]
            if None not in bs:
                return bytes(bs)
        return s.encode("utf-8")

    token_bytes: list = [None] * size
    for tok, i in vocab.items():
        if i in added:
            b = added[i].content.encode("utf-8")
        elif kind == "bytelevel":
            bs = [_UNICODE_TO_BYTE.get(c) for c in tok]
            b = bytes(bs) if None not in bs else legacy(tok)
        elif kind == "sentencepiece":
            m = _BYTE_TOKEN.match(tok)
            b = bytes([int(m.group(1), 16)]) if m else tok.replace(_SPIECE, " ").encode("utf-8")
        else:
            b = legacy(tok)
        token_bytes[i] = b
    for i, t in added.items():        # added tokens missing from get_vocab()
        if token_bytes[i] is None:
            token_bytes[i] = t.content.encode("utf-8")

    base_map: dict[bytes, list[int]] = {}
    byte_token: list = [None] * 256
    for i, b in enumerate(token_bytes):
        if not b or i in special:
            continue
        base_map.setdefault(b, []).append(i)
        if len(b) == 1 and byte_token[b[0]] is None:
            byte_token[b[0]] = i
    return TokenVocab(eos_token_ids=eos_ids, token_bytes=token_bytes,
                      special_ids=frozenset(special), base_map=base_map,
                      byte_token=byte_token, decoder_kind=kind)


def get_token_vocab(tokenizer, eos_token_ids=None) -> TokenVocab:
    """The (cached) :class:`TokenVocab` of a tokenizer. ``eos_token_ids`` defaults to
    ``[tokenizer.eos_token_id]``; the first one is outlines_core's EOS."""
    if eos_token_ids is None:
        eos_token_ids = [tokenizer.eos_token_id]
    if isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    eos = tuple(dict.fromkeys(int(e) for e in eos_token_ids if e is not None))
    if not eos:
        raise ValueError("constrained decoding needs an EOS token id")
    with _VOCAB_CACHE_LOCK:
        try:
            per_tok = _VOCAB_CACHE.setdefault(tokenizer, {})
        except TypeError:          # not weak-referenceable: cache on the object
            per_tok = tokenizer.__dict__.setdefault("_chatserve_token_vocab", {})
        tv = per_tok.get(eos)
        if tv is None:
            tv = _build_token_vocab(tokenizer, eos)
            per_tok[eos] = tv
        return tv


# ---------------------------------------------------------------------------------------
# Compiled constraint + per-request state
# ---------------------------------------------------------------------------------------

_EOS_ONLY = -1          # mask-cache key: only EOS allowed
_MAX_MASK_BYTES = 64 << 20  # per compiled constraint and device/size/dtype; then start over


class CompiledConstraint:
    """Result of ConstraintCompiler.compile(); immutable, shared by requests.

    mode: "full" (everything constrained), "triggered" (free text until a trigger, then
    constrained: tool_choice="auto"), or "free" (no constraint: tool_choice="none").
    """

    def __init__(self, *, kind: str, mode: str, vocab: TokenVocab, index=None,
                 regex: str | None = None, max_calls: int | None = None,
                 triggers: tuple[bytes, ...] = (), triggers_at_start_only: bool = False,
                 trigger_token_ids: dict | None = None, tag_token_ids=(),
                 family: str | None = None,
                 tool_names: tuple[str, ...] = (), compile_seconds: float = 0.0):
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
        self.compile_stats: dict = {}   # worker timings / automaton size (probe_s, index_s, states)
        self.eos_token_ids = vocab.eos_token_ids
        self._eos_set = frozenset(vocab.eos_token_ids)
        self._oc_eos = vocab.eos_token_ids[0]
        self._initial = index.get_initial_state() if index is not None else None
        self._masks: dict = {}      # (device, size, dtype) -> {state key: 0/-inf tensor}
        self._by_sig: dict = {}     # (device, size, dtype) -> {allowed-set signature: tensor}
        self._final_cache: dict = {}
        self._walks: dict = {}
        self._mask_lock = threading.Lock()
        self._max_trigger = max((len(t) for t in triggers), default=0)

    def __repr__(self):
        return (f"CompiledConstraint(kind={self.kind!r}, mode={self.mode!r}, "
                f"family={self.family!r}, regex_len={len(self.regex or '')})")

    def new_state(self) -> "ConstraintState":
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
        included when the output is complete)."""
        if state_key == _EOS_ONLY:
            return np.array(sorted(self.eos_token_ids), dtype=np.int64)
        ids = np.array(self.index.get_allowed_tokens(state_key), dtype=np.int64)
        drop = [self._oc_eos, SENTINEL_ID]
        if self.tag_token_ids and self._probe is not None and \
                self.index.get_next_state(state_key, self._probe) is not None:
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

    __slots__ = ("c", "_state", "_final", "_calls", "_free", "_scan", "_tail", "_lead",
                 "done", "triggered", "n_tokens")

    def __init__(self, compiled: CompiledConstraint):
        self.c = compiled
        self._calls = 0
        self._tail = b""
        self._lead = b""
        self.done = False            # EOS consumed
        self.triggered = False       # (triggered mode) the call part has started
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
        m = self.c.mask_for(self._state_key(), logits_row.device, logits_row.shape[-1],
                            logits_row.dtype)
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
                self._lead = lead              # undecided ("<|py...")
                return
            self._scan = False                 # the reply is plain text: stop looking
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
            buf = buf[pos + 1:]                # not a valid call start: keep looking

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
                state, rest = nxt, text[len(trig):]
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


# ---------------------------------------------------------------------------------------
# Compiler
# ---------------------------------------------------------------------------------------

_RE_META = set("\\.+*?()|[]{}^$#&-~")


def _re_escape(text: str) -> str:
    """Escape for the Rust ``regex`` syntax outlines_core uses (meta characters only)."""
    return "".join("\\" + ch if ch in _RE_META else ch for ch in text)


def _canonical(obj) -> str:
    # Key order is kept on purpose: outlines emits object properties in schema order,
    # so two schemas differing only in property order compile to different regexes.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _check_schema(schema, what: str) -> None:
    import jsonschema
    if not isinstance(schema, dict):
        raise ConstraintError(f"{what} must be a JSON object, got {type(schema).__name__}")
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ConstraintError(
            f"{what} is not a valid JSON schema: {e.message} (at {where})") from None
    except Exception as e:                              # e.g. unresolvable $schema
        raise ConstraintError(f"{what} is not a valid JSON schema: {e}") from None


def _check_representable(obj, what: str) -> None:
    """ConstraintError if a schema or tool definition holds a character in U+100000..U+10FFFF.

    Constrained output cannot spell those (END is one of them, and the tokens that could spell
    the others are left out of the vocabulary so that nothing but the sentinel spells END). A
    schema that requires one (a const, an enum value, a property name) would compile, then leave
    the model no allowed token but an EOS the constraint rejects, which fails the running batch;
    it is refused up front instead. The whole definition is checked, descriptions included: one
    rule for the client to read rather than a list of keywords that feed the regex.
    """
    todo = [(obj, "")]          # iterative: a deeply nested schema must not hit the recursion limit
    while todo:
        node, path = todo.pop()
        if isinstance(node, str):
            m = _UNREPRESENTABLE.search(node)
            if m:
                raise ConstraintError(
                    f"{what} contains the character U+{ord(m.group()):06X} at {path or '/'}; constrained "
                    "decoding cannot produce characters in U+100000..U+10FFFF (supplementary private "
                    "use area B)")
        elif isinstance(node, dict):
            for k, v in reversed(node.items()):
                todo.append((v, f"{path}/{k}"))
                todo.append((k, f"{path}/{k}"))
        elif isinstance(node, (list, tuple)):
            todo.extend((v, f"{path}/{i}") for i, v in reversed(list(enumerate(node))))


_EMPTY_PARAMS = {"type": "object", "properties": {}}

# Keywords outlines_core's regex builder accepts but does not enforce: the output could then break
# its own schema, so a schema that uses them is refused rather than silently loosened.
_UNENFORCED = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems",
               "minProperties", "maxProperties", "not", "if", "then", "else", "dependentRequired",
               "dependentSchemas", "contains", "minContains", "maxContains", "propertyNames",
               "patternProperties", "unevaluatedProperties", "unevaluatedItems")
_MAX_INT_ENUM = 1000


def enforceable_schema(schema, what: str = "JSON schema", path: str = ""):
    """A copy of schema that outlines enforces exactly, or ConstraintError naming what it cannot.

    A bounded integer range of at most 1000 values becomes an enum (which outlines enforces);
    other bounds and the keywords in _UNENFORCED are refused.
    """
    if isinstance(schema, list):
        return [enforceable_schema(s, what, f"{path}/{i}") for i, s in enumerate(schema)]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {k: enforceable_schema(v, what, f"{path}/{key}/{k}") for k, v in value.items()}
        elif key in ("enum", "const", "default", "examples", "required", "description", "title"):
            out[key] = value
        else:
            out[key] = enforceable_schema(value, what, f"{path}/{key}")
    lo, hi = out.get("minimum"), out.get("maximum")
    if isinstance(out.get("exclusiveMinimum"), int) and lo is None:
        lo = out["exclusiveMinimum"] + 1
    if isinstance(out.get("exclusiveMaximum"), int) and hi is None:
        hi = out["exclusiveMaximum"] - 1
    if (out.get("type") == "integer" and isinstance(lo, int) and isinstance(hi, int)
            and 0 <= hi - lo < _MAX_INT_ENUM and "multipleOf" not in out):
        for key in ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            out.pop(key, None)
        out["enum"] = list(range(lo, hi + 1))
    for key in _UNENFORCED:
        if key in out:
            hint = (f" (an integer range with both bounds and at most {_MAX_INT_ENUM} values is supported)"
                    if key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") else "")
            raise ConstraintError(f"{what} uses the unsupported keyword '{key}' at {path or '/'}: "
                                  f"constrained decoding cannot enforce it{hint}")
    return out


def build_json_object_regex(ws: str = DEFAULT_WHITESPACE) -> str:
    """Regex for response_format json_object: a JSON object whose nesting is bounded.

    outlines_core's generic ``{"type": "object"}`` regex (three container levels, arrays
    and objects everywhere) becomes ~1600 automaton states -- ~16 s of Index building on a
    49k vocabulary, ~3x that on 150k vocabularies -- because the automaton is not
    minimised and every ``X(,X)*`` list doubles what is below it. This shape covers the
    usual replies at ~1000 states (~3 s on 49k):
      top-level object; a value is a scalar, an object of (scalars | arrays of scalars),
      or an array of (scalars | flat objects of scalars).
    """
    from outlines_core.json_schema import NUMBER, STRING
    w = ws
    scal = f"({STRING}|{NUMBER}|true|false|null)"

    def obj(v):
        kv = STRING + w + ":" + w + v + w
        return r"\{" + w + "(" + kv + "(," + w + kv + ")*)?" + r"\}"

    def arr(v):
        return r"\[" + w + "(" + v + w + "(," + w + v + w + ")*)?" + r"\]"

    def alt(*xs):
        return "(" + "|".join(xs) + ")"

    return obj(alt(scal, obj(alt(scal, arr(scal))), arr(alt(scal, obj(scal)))))


@dataclass(frozen=True)
class ConstraintLimits:
    """The complexity budget of client constraints (see the module docstring, "Limits").

    max_regex_chars: longest regex outlines may write for a schema / tool set (None or 0: no limit).
    max_states: most automaton states; None: ``state_token_budget // vocabulary size``; 0: no limit.
    max_transitions: most token transitions the Index may hold, estimated (None or 0: no limit).
    """
    max_regex_chars: int | None = 100_000
    max_states: int | None = None
    max_transitions: int | None = 10_000_000
    state_token_budget: int = 500_000_000

    def states_for(self, vocab_size: int) -> int | None:
        if self.max_states is None:
            return max(1, self.state_token_budget // max(1, vocab_size))
        return self.max_states or None


_JOB_GRACE = 30.0   # how long past its deadline a caller waits for a job to report (kill + reap)


class _Job:
    __slots__ = ("fut", "deadline", "timeout", "kind")

    def __init__(self, deadline, timeout, kind):
        self.fut = concurrent.futures.Future()
        self.deadline = deadline
        self.timeout = timeout
        self.kind = kind


def _optional_hotspot(schema, path: str = ""):
    """(property count, path) of the object with the most properties and none required (the
    shape whose outlines regex grows with the square of its size), or (0, "")."""
    best = (0, "")
    todo = [(schema, path)]
    while todo:
        node, p = todo.pop()
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict) and len(props) > best[0] and not node.get("required"):
                best = (len(props), p or "/")
            todo.extend((v, f"{p}/{k}") for k, v in node.items())
        elif isinstance(node, list):
            todo.extend((v, f"{p}/{i}") for i, v in enumerate(node))
    return best


class ConstraintCompiler:
    """Compiles ConstraintSpecs for one tokenizer (one per model).

    vocab_size: the model's logits size (informational; masks follow the row size).
    eos_token_ids: the ids that end a constrained output (default: the tokenizer's EOS).

    whitespace_pattern: regex for the whitespace allowed between JSON tokens (default
      ``[ ]?``: at most one space, so a small model cannot loop on whitespace).
    family: tool-call family (default: detect_family(tokenizer)).
    max_parallel_calls: bound on calls when parallel_tool_calls is on (after that many
      complete calls only EOS is allowed; one more can slip through only when a single
      token ends one call and starts the next).
    cache_size: LRU size (compiled constraints).
    max_abandoned: kept for compatibility; unused (a compile past its timeout is killed, none
      keeps running).
    json_object_regex: override the regex used for kind "json_object"
      (default :func:`build_json_object_regex`).
    limits: the complexity budget (:class:`ConstraintLimits`; default: its defaults).
    pool: the compile worker pool (default: the process-wide
      :func:`engine.compile_worker.default_pool`).
    """

    def __init__(self, tokenizer, *, vocab_size: int | None = None, eos_token_ids=None,
                 family: str | None = None,
                 whitespace_pattern: str = DEFAULT_WHITESPACE, max_parallel_calls: int = 8,
                 cache_size: int = 64, max_abandoned: int = 4,
                 json_object_regex: str | None = None, limits: ConstraintLimits | None = None,
                 pool: CompilePool | None = None):
        self.tokenizer = tokenizer
        self.vocab = get_token_vocab(tokenizer, eos_token_ids)
        # the model's logits size (may exceed the tokenizer's); masks are sized from the
        # logits row itself, ids at or beyond it are dropped, the extra ones always banned
        self.vocab_size = vocab_size
        self.family = family or detect_family(tokenizer)
        get_format(self.family)
        self.ws = whitespace_pattern
        self.json_object_regex = json_object_regex or build_json_object_regex(whitespace_pattern)
        self.max_parallel_calls = max(1, int(max_parallel_calls))
        self.cache_size = cache_size
        self.max_abandoned = max_abandoned
        self.limits = limits or ConstraintLimits()
        self.pool = pool or default_pool()
        self._cache: OrderedDict = OrderedDict()
        self._inflight: dict = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        # a warm worker with this vocabulary loaded, so the first compile pays no start-up
        self.pool.ensure_warm(self.vocab.outlines_payload())

    def configure(self, *, limits: ConstraintLimits | None = None, workers: int | None = None,
                  worker_memory_bytes: int | None | bool = False) -> None:
        """Set the complexity budget and the worker pool's size / memory limit (None: none)."""
        if limits is not None:
            self.limits = limits
        self.pool.configure(max_workers=workers, memory_limit=worker_memory_bytes)

    # -- public --------------------------------------------------------------------
    def compile(self, spec: ConstraintSpec, timeout: float | None = 10.0) -> CompiledConstraint:
        """Compile (or fetch from the cache) a constraint.

        Raises ConstraintError (bad spec / schema / unsupported feature) or
        ConstraintTooComplex (over a complexity limit, or not done within ``timeout``
        seconds: then the worker process compiling it has been killed, nothing keeps running;
        ConstraintBusy when no worker came free in time). A retry of a spec that is still
        compiling waits on the same compilation instead of starting another one.
        """
        key = self._key(spec)
        with self._lock:
            hit = self._cache.get(key) if key is not None else None
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
        key, build = self._plan(spec)      # validation only on a miss
        timeout = timeout if timeout and timeout > 0 else None
        deadline = time.monotonic() + timeout if timeout else None
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
            self.misses += 1
            job = self._inflight.get(key)
            if job is None:
                # json_object is the server's own regex (bounded, once per server, but ~3x longer
                # on 128k vocabularies): it is never killed, a caller's timeout only stops waiting
                job = _Job(None if spec.kind == "json_object" else deadline, timeout, spec.kind)
                self._inflight[key] = job
                threading.Thread(target=self._worker, args=(key, build, job), daemon=True,
                                 name="constraint-compile").start()
        if job.deadline is not None and (deadline is None or job.deadline <= deadline):
            # the job ends by its own deadline (its worker killed): wait for that, so that on
            # return nothing of it is left running
            wait = max(0.0, job.deadline - time.monotonic()) + _JOB_GRACE
        else:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return job.fut.result(timeout=wait)
        except concurrent.futures.TimeoutError:
            # the job goes on (json_object, a prewarm, another caller's longer timeout)
            if spec.kind == "json_object":
                raise ConstraintBusy(
                    "the json_object constraint is still being compiled (once per server); retry "
                    "in a few seconds", retry_after=max(1, math.ceil(timeout or 1))) from None
            raise ConstraintTooComplex(
                f"schema too complex: compiling the {spec.kind} constraint took longer "
                f"than {timeout:g}s") from None

    def prewarm(self, specs=None) -> None:
        """Start compiling ``specs`` (default: json_object), with no timeout, and return at
        once; a later compile() of the same spec waits for / reuses it."""
        for spec in specs or [ConstraintSpec(kind="json_object")]:
            key, build = self._plan(spec)
            with self._lock:
                if key in self._cache or key in self._inflight:
                    continue
                job = _Job(None, None, spec.kind)
                self._inflight[key] = job
                threading.Thread(target=self._worker, args=(key, build, job), daemon=True,
                                 name="constraint-prewarm").start()

    def cache_info(self) -> dict:
        with self._lock:
            info = {"size": len(self._cache), "max": self.cache_size, "hits": self.hits,
                    "misses": self.misses, "inflight": len(self._inflight), "abandoned": 0}
        info["pool"] = self.pool.info()
        return info

    # -- internals -----------------------------------------------------------------
    def _worker(self, key, build, job: _Job) -> None:
        t0 = time.perf_counter()
        result = None
        try:
            result = build(job.deadline)
            result.compile_seconds = time.perf_counter() - t0
        except ConstraintError as e:
            err: BaseException = e
        except CompileTimeout:
            err = ConstraintTooComplex(
                f"schema too complex: compiling the {job.kind} constraint took longer than "
                f"{job.timeout:g}s (server limit --compile-timeout)")
        except CompilerBusy as e:
            err = ConstraintBusy(
                f"the constraint compiler is busy: {e} for {job.timeout:g}s; retry later",
                retry_after=max(1, math.ceil(job.timeout or 1)))
        except WorkerDied as e:
            err = ConstraintTooComplex(
                f"schema too complex: compiling the {job.kind} constraint failed: {e}")
        except CompilerUnavailable as e:    # a server fault: not a ConstraintError (a 500 upstream)
            err = e
        except BaseException as e:          # incl. pyo3 PanicException (a BaseException)
            err = ConstraintError(f"could not compile the constraint: {e}")
        with self._lock:
            self._inflight.pop(key, None)
            if result is not None:
                self._cache[key] = result
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        if result is not None:
            job.fut.set_result(result)
        else:
            job.fut.set_exception(err)

    def _schema_regexes(self, schemas: list, whats: list[str], deadline, where: str) -> list[str]:
        """outlines regexes of (enforceable) schemas, written in a worker; ConstraintTooComplex
        as soon as their total length passes the limit."""
        limit = self.limits.max_regex_chars or None
        status, payload = self.pool.call(
            ("regexes", [_canonical(s) for s in schemas], self.ws, limit), deadline)
        if status == "ok":
            return payload
        if status == "schema_error":
            i, msg = payload
            raise ConstraintError(f"unsupported {whats[i]}: {msg}")
        if status == "limit":
            _, total, _i = payload
            msg = (f"schema too complex: {where} compiles to a regex of at least {total:,} "
                   f"characters; the limit is {limit:,} (server limit --max-constraint-regex)")
            (n, path), w = max(((_optional_hotspot(s), w) for s, w in zip(schemas, whats)),
                               key=lambda t: t[0][0])
            if n >= 8:
                msg += (f". The largest cost is the object at {path} of the {w}: {n} properties, "
                        "none required; outlines writes one alternative per property of such an "
                        "object, so its regex grows with the square of the property count: mark "
                        "properties required, or use fewer")
            raise ConstraintTooComplex(msg)
        raise ConstraintError(f"could not compile the constraint: {payload}")

    def _index(self, regex: str, extra_ids=(), deadline=None, what: str = "the constraint",
               budget: bool = True):
        """(outlines_core Index of ``(regex)END``, stats), built in a worker process within
        ``deadline``; ``budget``: check the state / transition limits first."""
        lim = self.limits
        size = self.vocab.size
        max_states = lim.states_for(size) if budget else None
        max_trans = (lim.max_transitions or None) if budget else None
        vocab = self.vocab.outlines_payload(tuple(extra_ids))
        status, payload = self.pool.call(
            ("index", vocab[0], "(" + regex + ")" + _END, _END.encode("utf-8"), SENTINEL_ID, size,
             max_states, max_trans), deadline, vocab=vocab)
        if status == "ok":
            return payload
        if status == "limit":
            which, n, limit = payload
            if which == "states":
                msg = (f"schema too complex: {what} compiles to an automaton of {n:,} states; the "
                       f"limit is {limit:,} for this {size:,}-token vocabulary (server limit "
                       "--max-constraint-states). Long maxLength / maxItems / minItems, big enums "
                       "and many properties are what add states")
            else:
                msg = (f"schema too complex: {what} would need a token index of about {n:,} "
                       f"transitions; the limit is {limit:,} (server limit "
                       "--max-constraint-transitions). Every character a string may still take "
                       "(maxLength) is a state that allows nearly every token")
            raise ConstraintTooComplex(msg)
        msg = payload if isinstance(payload, str) else str(payload)
        raise ConstraintError(f"could not compile the constraint: {msg}")

    def _key(self, spec: ConstraintSpec):
        """Cache key from the raw spec (no validation); None if not JSON-serialisable."""
        kind = getattr(spec, "kind", None)
        try:
            if kind == "json_object":
                return ("json_object",)
            if kind == "json_schema":
                return ("json_schema", _canonical(spec.schema))
            if kind == "tools":
                return ("tools", self.family, _canonical(spec.tool_choice),
                        bool(spec.parallel_tool_calls), _canonical(spec.tools))
        except (TypeError, ValueError):
            return None
        return None

    def _plan(self, spec: ConstraintSpec):
        """Validate the spec (in the caller's thread) and return
        (cache key, build(deadline) run in a compile thread, the heavy part in a worker)."""
        kind = getattr(spec, "kind", None)
        key = self._key(spec)
        if key is None and kind in ("json_object", "json_schema", "tools"):
            raise ConstraintError(f"{kind} constraint is not valid JSON")
        if kind == "json_object":
            def build(deadline):
                rx = self.json_object_regex
                # the server's own regex: the timeout applies, the client budget does not
                index, stats = self._index(rx, (), deadline, "json_object", budget=False)
                c = CompiledConstraint(kind=kind, mode="full", vocab=self.vocab, index=index, regex=rx)
                c.compile_stats = stats
                return c
            return key, build
        if kind == "json_schema":
            schema = spec.schema
            _check_schema(schema, "response_format json_schema")
            _check_representable(schema, "response_format json_schema")
            schema = enforceable_schema(schema, "JSON schema")

            def build(deadline):
                rx, = self._schema_regexes([schema], ["JSON schema"], deadline, "the JSON schema")
                index, stats = self._index(rx, (), deadline, "the JSON schema")
                c = CompiledConstraint(kind=kind, mode="full", vocab=self.vocab, index=index, regex=rx)
                c.compile_stats = stats
                return c
            return key, build
        if kind == "tools":
            return key, self._plan_tools(spec)
        raise ConstraintError(f"unknown constraint kind {kind!r} "
                              "(expected json_object, json_schema or tools)")

    def _plan_tools(self, spec: ConstraintSpec):
        try:
            tools = normalize_tools(spec.tools)
        except ValueError as e:
            raise ConstraintError(str(e)) from None
        if not tools:
            raise ConstraintError("tools must be a non-empty list of function definitions")
        names: list[str] = []
        params: dict[str, dict] = {}
        for i, t in enumerate(tools):
            name = t.get("name")
            if not isinstance(name, str) or not name:
                raise ConstraintError(f"tools[{i}]: function name must be a non-empty string")
            if name in params:
                raise ConstraintError(f"tools[{i}]: duplicate function name {name!r}")
            p = t.get("parameters")
            if p is None or p == {}:
                p = _EMPTY_PARAMS
            _check_schema(p, f"parameters of tool {name!r}")
            _check_representable(t, f"tools[{i}] ({name!r})")
            names.append(name)
            params[name] = p
        choice = spec.tool_choice if spec.tool_choice is not None else "auto"
        if isinstance(choice, dict):       # {"type":"function","function":{"name":...}}
            choice = (choice.get("function") or {}).get("name") or choice.get("name")
        if not isinstance(choice, str) or not choice:
            raise ConstraintError("tool_choice must be 'auto', 'required', 'none' or a tool name")
        fam = self.family
        if choice == "none":
            return lambda deadline: CompiledConstraint(kind="tools", mode="free", vocab=self.vocab,
                                                       family=fam, tool_names=tuple(names))
        if choice in ("auto", "required"):
            allowed = names
        elif choice in params:
            allowed = [choice]
        else:
            raise ConstraintError(f"tool_choice names an unknown function {choice!r} "
                                  f"(defined: {', '.join(names)})")
        whats = [f"parameters schema of tool {n!r}" for n in allowed]
        schemas = [enforceable_schema(params[n], w) for n, w in zip(allowed, whats)]
        parallel = bool(spec.parallel_tool_calls)
        mode = "triggered" if choice == "auto" else "full"

        def build(deadline):
            fmt = FAMILIES[fam]
            ws = self.ws
            bodies = []
            for n, args_rx in zip(allowed, self._schema_regexes(schemas, whats, deadline,
                                                                  "the tool set")):
                bodies.append(
                    r"\{" + ws + r'"name"' + ws + ":" + ws
                    + _re_escape(json.dumps(n, ensure_ascii=False)) + ws + "," + ws
                    + _re_escape(json.dumps(fmt.args_key)) + ws + ":" + ws
                    + "(" + args_rx + ")" + ws + r"\}")
            call = "(" + "|".join(bodies) + ")"
            if parallel:     # X+ keeps one copy of the call automaton (X(sep X)* has two)
                rx = (fmt.first_prefix_re + "(" + fmt.prefix_re + call + fmt.suffix_re
                      + fmt.repeat_sep_re + ")+")
            else:
                rx = fmt.first_prefix_re + fmt.prefix_re + call + fmt.suffix_re + fmt.trailing_re
            # the family's tag tokens (e.g. Qwen's <tool_call>) are allowed as single
            # tokens in the call syntax even if the tokenizer flags them special
            extra = []
            trig_ids = {}
            for tag in fmt.tag_tokens:
                tid = self.vocab.token_id_for_text(tag)
                if tid is not None and tid not in self.vocab.eos_token_ids:
                    if tid in self.vocab.special_ids:
                        extra.append(tid)
                    if tag in fmt.triggers:
                        trig_ids[tag.encode("utf-8")] = tid
            index, stats = self._index(rx, extra, deadline, "the tool set")
            c = CompiledConstraint(
                kind="tools", mode=mode, vocab=self.vocab, index=index, regex=rx,
                max_calls=self.max_parallel_calls if parallel else 1,
                triggers=tuple(t.encode("utf-8") for t in fmt.triggers),
                triggers_at_start_only=fmt.triggers_at_start_only,
                trigger_token_ids=trig_ids, tag_token_ids=extra, family=fam,
                tool_names=tuple(allowed))
            c.compile_stats = stats
            return c
        return build
