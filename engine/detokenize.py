"""Incremental, UTF-8-safe detokenization and stop-string holdback."""

from __future__ import annotations

from functools import lru_cache

REPLACEMENT = "\ufffd"


def backend_decode(tokenizer):
    """The ``tokenizers`` library's own ``decode``, where the tokenizer's ``decode`` is transformers'
    wrapper around it unchanged (with ``clean_up_tokenization_spaces=False`` that wrapper only
    converts its arguments, but it costs 5x the decode itself: two decodes per token and row made
    it most of a decode step's time outside the forward at 64 rows); else None (tokenizers that
    decode their own way keep their ``decode``)."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: its decode, as is
        return None
    cls = type(tokenizer)
    if (
        not isinstance(tokenizer, TokenizersBackend)
        or cls.decode is not PreTrainedTokenizerBase.decode
        or cls._decode is not TokenizersBackend._decode
    ):
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    return getattr(backend, "decode", None)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas.

    Decodes a small window of ids and emits only the text past what was already emitted, and
    nothing while the window ends in an incomplete UTF-8 sequence (a character split over byte
    tokens decodes to U+FFFD until its last byte arrives). A few prompt tokens seed the window so
    that tokenizers that drop a leading space on the first piece decode the first token right.
    """

    __slots__ = ("tokenizer", "ids", "prefix_offset", "read_offset", "_backend")

    def __init__(self, tokenizer, prompt_ids: list[int] | None = None, context: int = 4):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-context:]) if prompt_ids else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self._backend = backend_decode(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith(REPLACEMENT):
            delta = text[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Text still held (an incomplete character at the very end), as decoded."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if len(text) > len(prefix) else ""


class StopStringMatcher:
    """Holds back text only while it could still be the start of a stop string.

    feed() returns (text safe to send, stopped). Once stopped, the stop string and everything
    after it are dropped.
    """

    __slots__ = ("stops", "pending", "max_hold")

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.max_hold = max((len(s) for s in self.stops), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        hit = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            out, self.pending = self.pending[:hit], ""
            return out, True
        hold = _held_suffix(self.pending, tuple(self.stops), self.max_hold)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _held_suffix(text: str, stops: tuple[str, ...], max_hold: int) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    for n in range(min(len(text), max_hold - 1), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stops):
            return n
    return 0


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table (byte-level BPE token strings -> bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenTexts:
    """Per-token display text and raw bytes, for logprobs (cached per token id)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._byte_level = self._is_byte_level(tokenizer)

    @staticmethod
    def _is_byte_level(tokenizer) -> bool:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return False
        dec = backend.decoder
        return dec is not None and "ByteLevel" in repr(dec)

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        raw: bytes | None = None
        if self._byte_level:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            table = byte_decoder()
            if piece is not None and all(ch in table for ch in piece):
                raw = bytes(table[ch] for ch in piece)
        if raw is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            raw = text.encode("utf-8")
        else:
            text = raw.decode("utf-8", errors="replace")
        hit = (text, list(raw))
        self._cache[token_id] = hit
        return hit
