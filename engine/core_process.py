"""The engine core process: the model, its KV pool and the step loop, in a child of the server
process (opt-in: ``engine_process: true``; the server side is engine/remote.py, the messages
engine/core_wire.py).

Why: the step loop is Python between GPU launches, and in the server process it shares the GIL with
the asyncio loop that parses requests and frames thousands of SSE chunks a second. Here it has an
interpreter to itself; detokenization and stop strings stay with it (per row, as in-process), so
what crosses the pipe is text ready to frame.

Threads here: the main thread loads the model, builds the engine, then reads commands from the pipe
(blocked in ``recv_bytes`` without the GIL the rest of the time); the engine thread runs the
unchanged ``Engine._loop``, and its ``_deliver`` sends each step's events as one message. The pipe
closing (the server process gone, however it went) stops the engine and ends the process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import threading
import time

from .core_wire import pack_event, unpack_constraint
from .engine import Engine, EngineConfig
from .request import TokenEvent

log = logging.getLogger("chatserve.engine")

_STATS_EVERY = 0.05  # seconds between stats snapshots sent with steps (and whenever the engine goes idle)


class _Sender:
    """One pickled message per send, from either thread; a pipe the server closed is ignored."""

    def __init__(self, conn):
        self.conn, self.lock, self.broken = conn, threading.Lock(), False

    def __call__(self, msg) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        with self.lock:
            if self.broken:
                return
            try:
                self.conn.send_bytes(data)
            except OSError:  # the server process is gone: nobody to tell
                self.broken = True


class CoreEngine(Engine):
    """The Engine, its events going down the pipe: a sequence's sink is the server's key for it."""

    def __init__(self, loaded, config: EngineConfig, send: _Sender):
        super().__init__(loaded, config)
        self._send = send
        self.open: dict[int, object] = {}  # key -> Sequence, until its last event is sent
        self._sent_counts = (0, 0)
        self._stats_at = 0.0

    def _deliver(self, out) -> None:
        events = []
        for seq, ev in out:
            events.append(pack_event(seq.sink, ev))
            if ev.finish_reason is not None:
                self.open.pop(seq.sink, None)
        counts = (self.scheduler.num_running, self.num_waiting)
        now = time.monotonic()
        stats = None
        if counts == (0, 0) or now - self._stats_at >= _STATS_EVERY:
            stats, self._stats_at = dict(self.stats), now
        if events or counts != self._sent_counts or stats is not None:
            self._sent_counts = counts
            self._send(("step", events, counts[0], counts[1], stats))

    def facts(self) -> dict:
        return dict(
            config=self.config,
            vocab_size=self.vocab_size,
            eos_ids=list(self.eos_ids),
            packed=self.packed,
            accepts_images=self.accepts_images,
            pid=os.getpid(),
        )


def _fail(send: _Sender, exc: BaseException) -> None:
    send(("failed", type(exc).__name__, str(exc)))


def core_main(conn, load, args: tuple, kwargs: dict, torch_threads: int | None, log_level: int, formatter=None) -> None:
    """The child's entry point (multiprocessing, spawn): load, report, build the engine, serve."""
    # the server drains on SIGTERM / Ctrl-C (sent to the whole process group too) and then stops
    # this process through the pipe; it exits by itself when the pipe closes
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # the server's own log format (--log-format json included) when it could be sent over, else text
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine core] %(message)s")
    if formatter is not None:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(formatter)
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    send = _Sender(conn)
    try:
        loaded = load(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 (said to the server, which raises it there)
        return _fail(send, exc)
    send(("loaded", dataclasses.replace(loaded, model=None)))
    try:
        first = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return
    if first[0][0] != "engine":
        return
    try:
        engine = CoreEngine(loaded, first[0][1], send)
    except BaseException as exc:  # noqa: BLE001
        return _fail(send, exc)
    send(("started", engine.facts()))
    engine.start()
    try:
        _serve(conn, engine, send)
    finally:
        engine.stop()  # fails what is still open ("server is shutting down"), sent if anyone listens
        send(("stopped",))


def _serve(conn, engine: CoreEngine, send: _Sender) -> None:
    constraints: dict[int, object] = {}  # ckey -> CompiledConstraint
    while True:
        try:
            commands = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            log.warning("the server process is gone; engine core stopping")
            return
        for cmd in commands:
            op = cmd[0]
            if op == "submit":
                _, key, request, ref = cmd
                try:
                    if ref is not None:
                        ckey, fields = ref
                        if fields is not None:
                            constraints[ckey] = unpack_constraint(fields, engine.tokenizer)
                        request.constraint = constraints[ckey].new_state()
                    seq = engine.open[key] = engine._submit(request, key)
                    if seq.finished:  # its last event went out before it was filed
                        engine.open.pop(key, None)
                except Exception as exc:  # noqa: BLE001 (overloaded, or a bug: this request alone fails)
                    log.error("%s refused by the engine core: %s: %s", request.request_id, type(exc).__name__, exc)
                    why = f"{type(exc).__name__}: {exc}"
                    error = TokenEvent(text="", token_ids=[], finish_reason="error", error=why)
                    send(("step", [pack_event(key, error)], engine.num_running, engine.num_waiting, None))
            elif op == "abort":
                seq = engine.open.get(cmd[1])
                if seq is not None:
                    engine.abort(seq)
            elif op == "forget":
                constraints.pop(cmd[1], None)
            elif op == "stop":
                return
