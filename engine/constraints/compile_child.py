"""The worker side of constraint compiles: what runs in a compile worker process.

A worker is started as ``python -c`` running :func:`_child_main` (the parent side is
:mod:`engine.constraints.compile_process`; the design is in :mod:`engine.constraints.compile_worker`).
It imports outlines_core only, never torch or numpy. It serves tasks -- ``ping``, ``vocab``
(load a pickled vocabulary), ``regexes`` (schemas -> regexes), ``index`` (probe the automaton's
size, then build the Index) -- from its pipe until the parent closes it; every reply is
``(status, payload, rss_bytes)``.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
from collections import OrderedDict

_WIDE = 64  # a probe state allowing more bytes than this is "inside a string": ~every token fits
_VOCABS_KEPT = 4  # vocabularies a worker keeps (one per tokenizer + tool-tag variant)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _byte_vocabulary(end: bytes, end_id: int, cache: dict):
    """The 255 single-byte tokens (0xF4 left out, as in the real vocabulary) + the END token."""
    v = cache.get((end, end_id))
    if v is None:
        import outlines_core as oc

        m = {bytes([b]): [b] for b in range(256) if b != 0xF4}
        m[end] = [end_id]
        v = oc.Vocabulary(256, m)
        cache[(end, end_id)] = v
    return v


def _probe(regex: str, vocab_len: int, end: bytes, end_id: int, cache: dict) -> tuple[int, int]:
    """(automaton states, estimated token transitions) of ``regex``, from an Index built on
    single-byte tokens: the same states the real Index will have (or more: a vocabulary without
    some bytes reaches fewer), ~200x less vocabulary to walk. A state allowing many bytes (inside
    a string) lets through nearly every token; one allowing few, about as many tokens as bytes."""
    import outlines_core as oc

    idx = oc.Index(regex, _byte_vocabulary(end, end_id, cache))
    trans = idx.get_transitions()
    est = sum(vocab_len if len(t) > _WIDE else len(t) for t in trans.values())
    return len(trans), est


def _handle(msg, vocabs: OrderedDict, bytevocabs: dict):
    op = msg[0]
    if op == "ping":
        return ("ok", os.getpid())
    if op == "vocab":
        _, key, payload = msg
        vocabs[key] = pickle.loads(payload)
        vocabs.move_to_end(key)
        while len(vocabs) > _VOCABS_KEPT:
            vocabs.popitem(last=False)
        return ("ok", None)
    if op == "regexes":
        # schemas (canonical JSON strings) -> regexes; stops as soon as the total passes max_chars
        _, schemas, ws, max_chars = msg
        from outlines_core.json_schema import build_regex_from_schema

        out, total = [], 0
        for i, schema in enumerate(schemas):
            try:
                rx = build_regex_from_schema(schema, ws)
            except BaseException as e:  # ValueError, or a Rust panic (a BaseException)
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                return ("schema_error", (i, _first_line(e)))
            total += len(rx)
            if max_chars and total > max_chars:
                return ("limit", ("regex_chars", total, i))
            out.append(rx)
        return ("ok", out)
    if op == "index":
        _, key, regex, end, end_id, vocab_len, max_states, max_trans = msg
        vocab = vocabs.get(key)
        if vocab is None:
            return ("need_vocab", None)
        vocabs.move_to_end(key)
        import outlines_core as oc

        stats = {}
        try:
            if max_states or max_trans:
                t0 = time.perf_counter()
                states, est = _probe(regex, vocab_len, end, end_id, bytevocabs)
                stats.update(states=states, transitions_estimate=est, probe_s=time.perf_counter() - t0)
                if max_states and states > max_states:
                    return ("limit", ("states", states, max_states))
                if max_trans and est > max_trans:
                    return ("limit", ("transitions", est, max_trans))
            t0 = time.perf_counter()
            index = oc.Index(regex, vocab)
        except BaseException as e:  # ValueError, or a Rust panic (a BaseException)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            return ("index_error", _first_line(e))
        stats["index_s"] = time.perf_counter() - t0
        return ("ok", (index, stats))
    return ("error", f"unknown task {op!r}")


def _child_main(fd: int, memory_limit: int) -> None:
    """Entry point of a worker process (``python -c``): serve the connection on ``fd``."""
    from multiprocessing.connection import Connection

    _worker_main(Connection(fd), memory_limit or None)


def _worker_main(conn, memory_limit: int | None) -> None:
    """Child process: serve tasks from ``conn`` until the parent closes it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    if memory_limit:
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
        except (ImportError, ValueError, OSError):
            pass
    import outlines_core  # noqa: F401  (loaded before the first task)

    vocabs: OrderedDict = OrderedDict()
    bytevocabs: dict = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply = _handle(msg, vocabs, bytevocabs)
        except MemoryError:
            reply = ("error", "the compile worker ran out of memory")
        except BaseException as e:  # incl. pyo3's PanicException: the worker carries on
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            reply = ("error", _first_line(e))
        try:
            conn.send((*reply, _rss_bytes()))
        except (OSError, ValueError):
            return
        reply = msg = None  # an idle worker holds no index
