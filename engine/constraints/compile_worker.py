"""Constraint compiles in worker processes that can really be stopped.

outlines_core builds an ``Index`` in Rust with no way to cancel it: a compile run in a thread
keeps its core busy and its memory held after the caller gave up on it (a 300-optional-property
schema ran on for ~30 s after its 10 s timeout and left the server's RSS 1.6 GB higher). So the
expensive steps -- schema -> regex, the automaton size probe, regex -> Index -- run in a
separate process, and a compile that passes its deadline is ended with SIGKILL: its CPU stops at
once and its memory goes back to the OS with the process. The next compile gets a fresh worker.

* One warm worker is kept, so an ordinary compile pays no process start-up (a spawned worker is
  ready in ~0.1 s and ~25 MB RSS; the outlines vocabulary, pickled once in the parent, ~0.6 MB
  for a 49k vocabulary, is sent to it once and unpickled in ~10 ms).
* A worker is a fresh interpreter (``python -c``, spawn semantics), never a fork: the parent has
  threads (engine loop, uvicorn, torch's pools) and forking those is unsafe. It is started with
  subprocess rather than multiprocessing's 'spawn' context because that one re-runs the parent's
  ``__main__`` script in the child, which breaks (and recurses in) any script that builds an
  engine without an ``if __name__ == "__main__"`` guard. Neither this module nor the package's
  ``__init__`` imports torch or numpy, so a worker only loads outlines_core; its end of a
  ``multiprocessing.Pipe`` is passed as an fd.
* At most ``max_workers`` compiles run at once (one core each: outlines builds an Index on one
  thread); more wait for a free worker, within their own deadline.
* Each worker runs under an address-space limit (``RLIMIT_AS``, ``memory_limit``): a schema whose
  regex or automaton blows up makes the worker fail its allocation and die instead of taking the
  machine's memory; the caller gets :class:`WorkerDied`.
* A worker whose RSS passed ``recycle_rss`` after a compile (allocators keep freed memory) is
  retired and replaced, so a big compile's memory does not stay held either.
* An ``Index`` crosses the process boundary by pickling (outlines_core serialises it to bytes:
  ~0.1 s for the 16 MB json_object index on a 49k vocabulary).

The protocol is private to :mod:`engine.constraints`: messages are tuples; every reply is
``(status, payload, rss_bytes)``.

The parts, each in its own module, all importable from here:

* :mod:`.compile_child` -- the worker side: the tasks a worker process serves (``_child_main``);
* :mod:`.compile_process` -- one worker process from the parent's side, and the errors a task ends in;
* :mod:`.compile_pool` -- :class:`CompilePool`, the workers handed out, and ``default_pool()``.
"""

from __future__ import annotations

# F401: the parts stay importable from here, as before the split. A worker process is started with
# ``from engine.constraints.compile_worker import _child_main``.
from .compile_child import (  # noqa: F401
    _VOCABS_KEPT,
    _WIDE,
    _byte_vocabulary,
    _child_main,
    _first_line,
    _handle,
    _probe,
    _rss_bytes,
    _worker_main,
)
from .compile_pool import CompilePool, default_pool  # noqa: F401
from .compile_process import (  # noqa: F401
    _ROOT,
    CompilerBusy,
    CompilerUnavailable,
    CompileTimeout,
    WorkerDied,
    _describe_exit,
    _Worker,
)

__all__ = ["CompilePool", "CompileTimeout", "CompilerBusy", "CompilerUnavailable", "WorkerDied", "default_pool"]
