"""The sampling fields chat and plain completions share, checked against OpenAI's ranges and turned
into the engine's SamplingParams (stop sequences, penalties, seed, logit_bias, ...)."""

from __future__ import annotations

import math
import re

from engine.request import SamplingParams

from .errors import bad_request
from .protocol import ChatCompletionRequest, CompletionRequest

MAX_STOP = 4
MAX_TOP_LOGPROBS = 5
TOKEN_ID = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() also takes "²" and "٣"


def _range(name: str, value, lo, hi, *, lo_open=False) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise bad_request(f"{name} must be a finite number", param=name, code="invalid_value")
    if value < lo or value > hi or (lo_open and value == lo):
        lo_txt = f"greater than {lo}" if lo_open else f"at least {lo}"
        raise bad_request(f"{name} must be {lo_txt} and at most {hi}; got {value}", param=name, code="invalid_value")


def _token_id(key: str) -> int | None:
    """A logit_bias key as a token id: ASCII decimal digits only (no sign, no spaces), else None.

    The one parser for these keys: int() also accepts " 5", "+5" and "٣" and rejects "²", which
    str.isdigit() accepts. A number of more than 18 digits is no token id (and int() raises past
    4300 digits), so it is refused before int() sees it."""
    if not TOKEN_ID.fullmatch(key):
        return None
    digits = key.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else None


def _sampling(
    req: ChatCompletionRequest | CompletionRequest,
    *,
    vocab_size: int,
    max_tokens: int | None,
    logprobs: bool,
    top_logprobs: int,
) -> SamplingParams:
    """The fields chat and plain completions share, checked (OpenAI's ranges), as engine parameters."""
    _range("temperature", req.temperature, 0.0, 2.0)
    _range("top_p", req.top_p, 0.0, 1.0, lo_open=True)
    _range("frequency_penalty", req.frequency_penalty, -2.0, 2.0)
    _range("presence_penalty", req.presence_penalty, -2.0, 2.0)
    if req.min_tokens is not None and req.min_tokens < 0:
        raise bad_request("min_tokens must be at least 0", param="min_tokens", code="invalid_value")
    if req.seed is not None and not (-(2**63) <= req.seed < 2**64):
        raise bad_request("seed must fit in 64 bits", param="seed", code="invalid_value")

    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise bad_request(
            f"stop may hold at most {MAX_STOP} sequences; got {len(stop)}", param="stop", code="invalid_value"
        )
    if any(s == "" for s in stop):
        raise bad_request("stop sequences must be non-empty strings", param="stop", code="invalid_value")

    if req.stream_options is not None and not req.stream:
        raise bad_request(
            "stream_options is only allowed when stream is true", param="stream_options", code="invalid_value"
        )

    logit_bias = {}
    for key, value in (req.logit_bias or {}).items():
        token_id = _token_id(key)
        if token_id is None or not token_id < vocab_size:
            raise bad_request(
                f"logit_bias keys must be token ids between 0 and {vocab_size - 1}; got {key!r}",
                param="logit_bias",
                code="invalid_value",
            )
        _range(f"logit_bias[{key}]", value, -100.0, 100.0)
        logit_bias[token_id] = float(value)

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=None if req.seed is None else req.seed % (2**63),
        stop=stop,
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        logit_bias=logit_bias,
        min_tokens=req.min_tokens or 0,
        ignore_eos=bool(req.ignore_eos),
    )
