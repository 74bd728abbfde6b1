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
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict

log = logging.getLogger("chatserve.engine.compile")

__all__ = ["CompilePool", "CompileTimeout", "CompilerBusy", "CompilerUnavailable", "WorkerDied", "default_pool"]

_WIDE = 64  # a probe state allowing more bytes than this is "inside a string": ~every token fits
_VOCABS_KEPT = 4  # vocabularies a worker keeps (one per tokenizer + tool-tag variant)
# the folder that holds the engine package (engine/constraints/compile_worker.py -> three levels up)
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class CompileTimeout(Exception):
    """The deadline passed while the worker was compiling; it has been killed."""


class CompilerBusy(Exception):
    """The deadline passed while waiting for a free worker."""


class CompilerUnavailable(RuntimeError):
    """A worker process could not be started (a server fault, not the schema's)."""


class WorkerDied(Exception):
    """The worker process ended in the middle of a task (memory limit, crash)."""

    def __init__(self, message: str, exitcode=None):
        super().__init__(message)
        self.exitcode = exitcode


# ---------------------------------------------------------------------------------------
# Worker side (runs in the child process; imports outlines_core only)
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------


class _Worker:
    """One worker process and the parent's end of its pipe. Used by one thread at a time."""

    def __init__(self, memory_limit: int | None, generation: int):
        parent_end, child_end = multiprocessing.Pipe()  # a socketpair; pickled messages
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import sys; from engine.constraints.compile_worker import _child_main; "
                    "_child_main(int(sys.argv[1]), int(sys.argv[2]))",
                    str(child_end.fileno()),
                    str(memory_limit or 0),
                ],
                pass_fds=(child_end.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
                cwd=_ROOT,
            )
        finally:
            child_end.close()
        self.conn = parent_end
        self.pid = self.proc.pid
        self.memory_limit = memory_limit
        self.generation = generation
        self.rss = 0
        self.tasks = 0
        self.vocabs: OrderedDict = OrderedDict()  # mirror of the worker's vocabulary LRU

    def alive(self) -> bool:
        return self.proc.poll() is None

    def call(self, msg, deadline: float | None):
        """Send one task and wait for its reply until ``deadline`` (time.monotonic()).

        CompileTimeout (worker killed) when the deadline passes; WorkerDied when it ends."""
        if deadline is not None and time.monotonic() >= deadline:
            raise CompileTimeout("deadline passed before the task started")  # worker stays usable
        try:
            self.conn.send(msg)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self.conn.poll(remaining):
                self.kill()
                raise CompileTimeout(f"killed compile worker pid {self.pid}")
            reply = self.conn.recv()
        except (EOFError, OSError) as e:
            with contextlib.suppress(Exception):
                self.proc.wait(2)  # it is exiting: let it finish, to read why
            self.kill()
            code = self.proc.returncode
            log.warning("constraint compile worker pid %d died: %s", self.pid, _describe_exit(code) or e)
            raise WorkerDied(
                f"the compile worker ended ({_describe_exit(code, self.memory_limit) or e})", code
            ) from None
        *reply, self.rss = reply
        self.tasks += 1
        return reply

    def kill(self) -> None:
        """SIGKILL and reap: the process, its CPU use and its memory are gone on return."""
        with contextlib.suppress(Exception):
            if self.proc.poll() is None:
                self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(10)
        with contextlib.suppress(Exception):
            self.conn.close()

    def stop(self) -> None:
        """Ask the worker to exit (EOF on its pipe); kill it if it does not."""
        with contextlib.suppress(Exception):
            self.conn.close()
        with contextlib.suppress(Exception):
            self.proc.wait(2)
        self.kill()


def _describe_exit(code, memory_limit: int | None = None) -> str:
    if code is None:
        return ""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if -code in (signal.SIGABRT, signal.SIGKILL, signal.SIGSEGV):
            limit = f" of {memory_limit / 2**30:.3g} GiB (server limit --compile-memory-gb)" if memory_limit else ""
            return f"{name}, most likely at its memory limit{limit}"
        return name
    return f"exit code {code}"


class CompilePool:
    """Worker processes for constraint compiles (see the module docstring).

    max_workers: compiles that may run at once (each one core).
    memory_limit: address-space limit of each worker in bytes (None: no limit).
    recycle_rss: a worker whose RSS passed this after a task is replaced.
    """

    def __init__(self, max_workers: int = 2, memory_limit: int | None = 4 << 30, recycle_rss: int = 256 << 20):
        self.max_workers = max(1, int(max_workers))
        self.memory_limit = memory_limit or None
        self.recycle_rss = recycle_rss
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._starting = 0  # workers being started (counted against max_workers)
        self._warming = 0  # ... of which by ensure_warm (they go to _idle)
        self._generation = 0
        self._preload = None  # (key, payload function): sent to every new worker
        self._closed = False
        self.started = 0
        self.killed = 0
        self.died = 0
        self.recycled = 0
        self.killed_pids: list[int] = []  # the last few, for diagnostics / tests
        self.start_seconds: list[float] = []

    # -- configuration -------------------------------------------------------------
    def configure(self, *, max_workers: int | None = None, memory_limit: int | None | bool = False) -> None:
        """Change the pool's size / the workers' memory limit (``memory_limit=None``: no limit).
        Idle workers started under another memory limit are replaced."""
        with self._cond:
            if max_workers is not None:
                self.max_workers = max(1, int(max_workers))
            if memory_limit is not False and (memory_limit or None) != self.memory_limit:
                self.memory_limit = memory_limit or None
                self._generation += 1
                stale, self._idle = self._idle, []
            else:
                stale = []
            while len(self._idle) + len(self._busy) > self.max_workers and self._idle:
                stale.append(self._idle.pop())
            self._cond.notify_all()
        for w in stale:
            w.stop()

    # -- tasks -------------------------------------------------------------------------
    def call(self, msg, deadline: float | None, vocab=None):
        """Run one task on a free worker; returns ``(status, payload)``.

        vocab: (key, payload function) the task needs; sent to the worker first if it lacks it.
        Raises CompilerBusy (no worker free before the deadline), CompileTimeout, WorkerDied."""
        w = self._acquire(deadline)
        ok = False
        try:
            if vocab is not None:
                self._ensure_vocab(w, vocab, deadline)
            reply = w.call(msg, deadline)
            if reply[0] == "need_vocab" and vocab is not None:  # evicted meanwhile
                w.vocabs.pop(vocab[0], None)
                self._ensure_vocab(w, vocab, deadline)
                reply = w.call(msg, deadline)
            ok = True
            return tuple(reply)
        except CompileTimeout:
            ok = w.alive()  # not killed: the deadline passed before it started
            if not ok:
                with self._cond:
                    self.killed += 1
                    self.killed_pids = (self.killed_pids + [w.pid])[-16:]
                log.warning("constraint compile passed its deadline: worker pid %d killed", w.pid)
            raise
        except WorkerDied:
            with self._cond:
                self.died += 1
            raise
        finally:
            self._release(w, ok)

    def _ensure_vocab(self, w: _Worker, vocab, deadline) -> None:
        key, payload_fn = vocab
        if key in w.vocabs:
            w.vocabs.move_to_end(key)
            return
        status, detail = w.call(("vocab", key, payload_fn()), deadline)
        if status != "ok":
            raise WorkerDied(f"the compile worker could not load the vocabulary: {detail}")
        w.vocabs[key] = True
        while len(w.vocabs) > _VOCABS_KEPT:
            w.vocabs.popitem(last=False)
        with self._cond:
            self._preload = vocab

    def _acquire(self, deadline: float | None) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise CompilerUnavailable("the compile pool is closed")
                while self._idle:
                    w = self._idle.pop()
                    if w.alive():
                        self._busy.add(w)
                        return w
                    w.kill()  # died while idle: reap it, look again
                # a warm worker on its way (~0.1 s) is worth waiting for; else start one if allowed
                if not self._warming and len(self._busy) + self._starting < self.max_workers:
                    self._starting += 1
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise CompilerBusy(f"all {self.max_workers} compile workers stayed busy")
                self._cond.wait(remaining)
        w = self._start()
        with self._cond:
            self._starting -= 1
            if w is not None:
                self._busy.add(w)
            self._cond.notify_all()
        if w is None:
            raise CompilerUnavailable("could not start a constraint compile worker (see the server log)")
        return w

    def _start(self) -> _Worker | None:
        """Start a worker; the caller counted it in _starting and uncounts it."""
        t0 = time.perf_counter()
        try:
            with self._cond:
                gen, limit, preload = self._generation, self.memory_limit, self._preload
            w = _Worker(limit, gen)
        except Exception:
            log.exception("could not start a constraint compile worker")
            return None
        if preload is not None:
            with contextlib.suppress(Exception):
                self._ensure_vocab(w, preload, time.monotonic() + 60)
        with self._cond:
            self.started += 1
            self.start_seconds = (self.start_seconds + [time.perf_counter() - t0])[-16:]
        return w

    def _release(self, w: _Worker, healthy: bool) -> None:
        retire = (
            not healthy
            or not w.alive()
            or w.generation != self._generation
            or self._closed
            or (self.recycle_rss and w.rss > self.recycle_rss)
        )
        with self._cond:
            if healthy and retire:
                self.recycled += 1
            self._busy.discard(w)
            if not retire:
                self._idle.append(w)
            self._cond.notify_all()
        if retire:
            w.stop() if healthy else w.kill()
            self.ensure_warm()

    def ensure_warm(self, vocab=None) -> None:
        """Start a worker in the background if none is idle (and one more is allowed), so the
        next compile does not pay the start-up. ``vocab``: (key, payload function) to preload."""
        with self._cond:
            if vocab is not None:
                self._preload = vocab
            if self._closed or self._idle or self._starting or len(self._busy) + self._starting >= self.max_workers:
                return
            self._starting += 1
            self._warming += 1

        def start():
            w = self._start()
            with self._cond:
                self._starting -= 1
                self._warming -= 1
                keep = w is not None and not self._closed
                if keep:
                    self._idle.append(w)
                self._cond.notify_all()
            if w is not None and not keep:
                w.stop()

        threading.Thread(target=start, daemon=True, name="constraint-worker-start").start()

    # -- introspection / shutdown ---------------------------------------------------------
    def pids(self) -> dict:
        """{"idle": [...], "busy": [...]} worker pids."""
        with self._cond:
            return {"idle": [w.pid for w in self._idle], "busy": [w.pid for w in self._busy]}

    def info(self) -> dict:
        with self._cond:
            return {
                "workers": len(self._idle) + len(self._busy),
                "idle": len(self._idle),
                "busy": len(self._busy),
                "max_workers": self.max_workers,
                "memory_limit": self.memory_limit,
                "started": self.started,
                "killed": self.killed,
                "died": self.died,
                "recycled": self.recycled,
            }

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no worker is starting (for tests / shutdown)."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._starting and time.monotonic() < end:
                self._cond.wait(0.05)
            return not self._starting

    def close(self) -> None:
        with self._cond:
            self._closed = True
            workers, self._idle = self._idle, []
            self._cond.notify_all()
        for w in workers:
            w.stop()


_DEFAULT: CompilePool | None = None
_DEFAULT_LOCK = threading.Lock()


def default_pool() -> CompilePool:
    """The process-wide pool every ConstraintCompiler uses unless given another."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = CompilePool()
            atexit.register(_DEFAULT.close)
        return _DEFAULT
