"""The complexity budget of client constraints (:class:`ConstraintLimits`; ``chatserve serve``
flags in brackets).

A client's schema or tool set is compiled in a worker process, never in the server process, and
is refused with ConstraintTooComplex (HTTP 400 ``schema_too_complex``, naming the limit) when it
passes one of:

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
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ConstraintLimits"]


@dataclass(frozen=True)
class ConstraintLimits:
    """The complexity budget of client constraints (see the module docstring).

    max_regex_chars: longest regex outlines may write for a schema / tool set (None or 0: no limit).
    max_states: most automaton states; None: ``state_token_budget // vocabulary size``; 0: no limit.
    max_transitions: most token transitions the Index may hold, estimated (None or 0: no limit).
    state_token_budget: states x vocabulary size that max_states=None allows.
    """

    max_regex_chars: int | None = 100_000
    max_states: int | None = None
    max_transitions: int | None = 10_000_000
    state_token_budget: int = 500_000_000

    def states_for(self, vocab_size: int) -> int | None:
        if self.max_states is None:
            return max(1, self.state_token_budget // max(1, vocab_size))
        return self.max_states or None
