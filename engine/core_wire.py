"""What crosses the pipe between the server process and the engine core process (engine/remote.py,
engine/core_process.py). Every message is one pickled tuple sent with ``send_bytes``.

Server -> core, a list of commands per message (the writer sends whatever has queued up):
  ("engine", EngineConfig)                  build the engine on the loaded model (once, at start)
  ("submit", key, GenerationRequest, ref)   a request; its constraint travels in ``ref`` (below)
  ("abort", key)                            the client went away
  ("forget", ckey)                          a compiled constraint no request will name again
  ("stop",)                                 fail what is open ("shutting down"), then exit

Core -> server, one message each:
  ("loaded", LoadedModel without its model)  (its tokenizer and processor come along)
  ("started", facts)                          the engine's vocab size, EOS ids, filled-in config...
  ("failed", exception type name, message)    loading or building failed
  ("step", events, running, waiting, stats)   one engine step: every row's events in one list
  ("stopped",)

A request's key is an int the server picks. An event is a plain tuple (key, *TokenEvent fields in
order): cheaper to pickle than the dataclass. A compiled constraint is sent once, the first time a
request uses it, as ``(ckey, fields)``; later requests send ``(ckey, None)``; each request gets a
fresh state from the core's copy. The outlines Index pickles (the compile workers send it the
same way); masks and caches are rebuilt in the core as it uses them.
"""

from __future__ import annotations

import dataclasses

from .request import TokenEvent

EVENT_FIELDS = tuple(f.name for f in dataclasses.fields(TokenEvent))


def pack_event(key: int, ev: TokenEvent) -> tuple:
    return (key, *(getattr(ev, name) for name in EVENT_FIELDS))


def unpack_event(t: tuple) -> TokenEvent:
    return TokenEvent(*t[1:])


# CompiledConstraint's constructor arguments (engine/constraints/state.py) other than its vocab,
# which the core rebuilds from its own tokenizer and the EOS ids
_CONSTRAINT_FIELDS = (
    "kind",
    "mode",
    "index",
    "regex",
    "max_calls",
    "triggers",
    "triggers_at_start_only",
    "trigger_token_ids",
    "family",
    "tool_names",
    "compile_seconds",
)


def pack_constraint(compiled) -> dict:
    fields = {name: getattr(compiled, name) for name in _CONSTRAINT_FIELDS}
    fields["tag_token_ids"] = tuple(compiled.tag_token_ids)
    fields["eos_token_ids"] = tuple(compiled.vocab.eos_token_ids)
    return fields


def unpack_constraint(fields: dict, tokenizer):
    from .constraints.state import CompiledConstraint
    from .constraints.vocabulary import get_token_vocab

    fields = dict(fields)
    vocab = get_token_vocab(tokenizer, list(fields.pop("eos_token_ids")))  # cached per tokenizer
    return CompiledConstraint(vocab=vocab, **fields)
