"""Constrained decoding: JSON object / JSON schema / tool calls, on outlines_core.

One job per module:

* :mod:`.errors` -- ConstraintError and its kinds, for the engine and the server alike.
* :mod:`.schemas` -- what a JSON schema or a tool set must be before it is compiled (each rule
  checked once, there; the server calls the same checks while validating a request).
* :mod:`.regexes` -- the regexes chatserve writes itself (json_object, tool-call syntax).
* :mod:`.vocabulary` -- the tokenizer's vocabulary as bytes (:func:`get_token_vocab`), and the END
  sentinel pseudo-token that marks a complete output.
* :mod:`.limits` -- the complexity budget of client constraints (:class:`ConstraintLimits`).
* :mod:`.compile_worker` -- the worker processes compiles run in, killed at their deadline.
* :mod:`.compiler` -- :class:`ConstraintCompiler`, one per model: ``compile(spec)`` turns a
  :class:`~engine.request.ConstraintSpec` into a :class:`CompiledConstraint`, with an LRU cache.
* :mod:`.state` -- :class:`CompiledConstraint`, shared by requests, and the per-request
  :class:`ConstraintState` the engine drives every step: ``mask_logits(row)`` before sampling,
  ``advance(token_id)`` after.

Every name in ``__all__`` can be imported from here; each is loaded from its module on first use,
so that importing the light modules (the errors, the checks, the compile worker's child process)
does not load torch or numpy, which only :mod:`.state` needs.
"""

from __future__ import annotations

import importlib

# name -> the module (in this package) that defines it
_EXPORTS = {
    "ConstraintError": "errors",
    "ConstraintTooComplex": "errors",
    "ConstraintBusy": "errors",
    "ConstraintViolation": "errors",
    "check_schema": "schemas",
    "check_tools": "schemas",
    "check_representable": "schemas",
    "enforceable_schema": "schemas",
    "DEFAULT_WHITESPACE": "regexes",
    "build_json_object_regex": "regexes",
    "TokenVocab": "vocabulary",
    "get_token_vocab": "vocabulary",
    "ConstraintLimits": "limits",
    "ConstraintCompiler": "compiler",
    "CompiledConstraint": "state",
    "ConstraintState": "state",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
