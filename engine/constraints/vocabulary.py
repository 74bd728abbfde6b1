"""A tokenizer's vocabulary as bytes, for outlines_core: token ids -> the exact bytes they add to
the text, built once per tokenizer (cached).

Byte-level BPE: the GPT-2 byte alphabet mapped back; sentencepiece: "\u2581" -> space and <0xXX>
-> byte; added tokens: their content. Special tokens -- ``all_special_ids`` plus every added token
flagged ``special`` (SmolLM2 has 17, only 3 of them in ``all_special_ids``) -- and all EOS ids are
left out of the outlines vocabulary, so they can never be generated inside a constrained output;
EOS is allowed by the mask exactly when the output is complete. (Exception, tools only: a
family's call tag that is a special token, e.g. ``<|python_tag|>``, is allowed at the tag
positions, never inside JSON strings.)

The END sentinel pseudo-token that marks a complete output lives here too (see ``END``).
No torch or numpy here; outlines_core is imported when an outlines vocabulary is first built.
"""

from __future__ import annotations

import json
import pickle
import re
import threading
import uuid
import weakref
from dataclasses import dataclass, field

from ..detokenize import byte_decoder

__all__ = ["TokenVocab", "get_token_vocab", "END", "SENTINEL_ID", "UNREPRESENTABLE"]

_UNICODE_TO_BYTE = byte_decoder()  # GPT-2 byte-level BPE: printable char -> byte

# END sentinel. outlines_core 0.2.14's Index only keeps, out of a *final* state, the
# tokens whose walk ends in a final state again: with regex "(ab)+", after "ab" the
# token "a" is missing (only "ab" is allowed), so a second tool call, "1.5" after a
# top-level "1", etc. could never be generated. Every regex is therefore compiled as
# "<regex>END", where END is one private-use character spelled only by a pseudo-token
# (SENTINEL_ID, never sampled, filtered out of every mask): no real state is final, and
# "complete" means "the sentinel could be consumed here".
END = "\U0010fffd"
SENTINEL_ID = 2**31 - 3
# What constrained output cannot contain: END itself, and every other code point whose UTF-8
# starts with 0xF4 (no real token may hold that byte, see TokenVocab.outlines_vocabulary).
UNREPRESENTABLE = re.compile("[\U00100000-\U0010ffff]")
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
                self._text_ids[want] = next((i for i, b in enumerate(self.token_bytes) if b == want), None)
            return self._text_ids[want]

    def outlines_vocabulary(self, extra_ids: tuple[int, ...] = ()):
        """outlines_core.Vocabulary of the non-special tokens (+ ``extra_ids``) and the
        END sentinel pseudo-token (see ``END``), cached.

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
                m[END.encode("utf-8")] = [SENTINEL_ID]
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


_VOCAB_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
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
    for i, t in added.items():  # added tokens missing from get_vocab()
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
    return TokenVocab(
        eos_token_ids=eos_ids,
        token_bytes=token_bytes,
        special_ids=frozenset(special),
        base_map=base_map,
        byte_token=byte_token,
        decoder_kind=kind,
    )


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
        except TypeError:  # not weak-referenceable: cache on the object
            per_tok = tokenizer.__dict__.setdefault("_chatserve_token_vocab", {})
        tv = per_tok.get(eos)
        if tv is None:
            tv = _build_token_vocab(tokenizer, eos)
            per_tok[eos] = tv
        return tv
