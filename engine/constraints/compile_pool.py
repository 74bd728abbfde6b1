"""The pool of compile worker processes: at most ``max_workers`` compiles at once, one warm worker
kept, workers retired when their RSS grew or their memory limit changed (the design is in
:mod:`engine.constraints.compile_worker`; one worker is :mod:`engine.constraints.compile_process`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time

from .compile_child import _VOCABS_KEPT
from .compile_process import CompilerBusy, CompilerUnavailable, CompileTimeout, WorkerDied, _Worker

log = logging.getLogger("chatserve.engine.compile")


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
