"""The engine with its step loop in a child process (engine/core_process.py), seen from the server
process: the same surface the server uses of an in-process Engine.

Opt-in (``engine_process: true``, ``--engine-process``). Two steps, as with an in-process engine:
``load_model_in_core(spec, ...)`` (``load_model`` in a fresh child, "spawn"; returns a RemoteModel,
a LoadedModel whose model stays in the child, with the tokenizer and processor here), then
``RemoteEngine(remote_model, EngineConfig(...)).start()`` (the child builds the engine).

What stays here: prompts and chat templates, token texts, constraint compiling (PromptAPI, as in
process), and each request's bookkeeping: its key, its EventStream (engine/stream.py), the count
of open requests behind 429s, /health and draining. A writer thread sends queued commands (one
message for all that queued up; pickled off the event loop); a reader thread turns each step's
message into events for the streams' event loops, one ``call_soon_threadsafe`` per loop per step,
as the in-process engine does. Messages: engine/core_wire.py.

The child gone (killed, crashed): every open request ends with an error event, ``alive`` turns
False (/ready, /health say so, new requests get 503). The child ignores SIGINT and SIGTERM (the
server drains, then stops it) and exits when the pipe closes, so it never outlives the server.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import socket
import threading
import weakref
from collections import defaultdict
from dataclasses import dataclass

from .core_process import core_main
from .core_wire import pack_constraint, unpack_event
from .detokenize import TokenTexts
from .engine import EngineConfig
from .loader import LoadedModel, ModelLoadError, load_model
from .prompt import PromptRenderer
from .prompt_api import PromptAPI
from .request import GenerationRequest, TokenEvent
from .scheduler import EngineOverloaded
from .stream import EventStream, deliver

log = logging.getLogger("chatserve.engine")

_CORES: weakref.WeakSet = weakref.WeakSet()


class CoreProcess:
    """The child and its pipe: start-up handshakes, and ending it."""

    def __init__(self, load, args: tuple, kwargs: dict, torch_threads: int | None = None):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        level = logging.getLogger().getEffectiveLevel()
        formatter = next((h.formatter for h in logging.getLogger().handlers if h.formatter is not None), None)
        try:  # the child logs in the server's format (a JSON formatter pickles; a custom one may not)
            pickle.dumps(formatter)
        except Exception:  # noqa: BLE001
            formatter = None
        self.process = ctx.Process(
            target=core_main,
            args=(child_conn, load, args, kwargs, torch_threads, level, formatter),
            name="chatserve-engine-core",
            daemon=True,
        )
        self.process.start()
        child_conn.close()
        _CORES.add(self)

    def send(self, commands: list) -> None:
        self.conn.send_bytes(pickle.dumps(commands, protocol=pickle.HIGHEST_PROTOCOL))

    def expect(self, what: str) -> tuple:
        """The child's next message, which must be ``what``; its failure raised here."""
        while not self.conn.poll(0.5):
            if not self.running() and not self.conn.poll(0):
                raise RuntimeError(f"the engine core process exited (exit code {self.process.exitcode})")
        try:
            msg = pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError):
            self.process.join(5)
            raise RuntimeError(f"the engine core process exited (exit code {self.process.exitcode})") from None
        if msg[0] == "failed":
            _, kind, message = msg
            if kind == "ModelLoadError":
                raise ModelLoadError(message)
            raise RuntimeError(f"engine core: {kind}: {message}")
        if msg[0] != what:
            raise RuntimeError(f"engine core: expected {what!r}, got {msg[0]!r}")
        return msg

    def running(self) -> bool:
        """The child has not exited. Its sentinel says so even while another thread of ours reaps
        it (the reader's ``_core_gone`` joins it too: a join racing it gets ECHILD from waitpid and
        ``is_alive()`` answers True until that thread records the exit code), and killing by pid
        then could hit whatever process got the number next."""
        return self.process.exitcode is None and not multiprocessing.connection.wait([self.process.sentinel], 0)

    def end(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the child to exit; kill it if it is still running then."""
        self.process.join(timeout)
        if self.running():
            log.warning("engine core process did not stop in %.0f s; killing it", timeout)
            self.process.kill()
            self.process.join(10)

    def close(self, timeout: float = 40.0) -> None:
        """Ask the child to stop, wait for it, and kill it if it does not go."""
        if self.running():
            try:
                self.send([("stop",)])
            except OSError:
                pass
        self.end(timeout)

    def hang_up(self) -> None:
        """Shut the pipe down (both ways): the child reads its end and stops; a thread of ours
        blocked reading it wakes (closing the descriptor under it would not wake it)."""
        try:
            s = socket.socket(fileno=os.dup(self.conn.fileno()))
            s.shutdown(socket.SHUT_RDWR)
            s.close()
        except OSError:
            pass


@atexit.register
def _close_cores() -> None:  # before multiprocessing's own exit hook (atexit runs last-in first-out)
    for core in list(_CORES):
        core.hang_up()  # the child sees the pipe close and stops
        core.end(10)


@dataclass
class RemoteModel(LoadedModel):
    """A LoadedModel whose model lives in the engine core process (``model`` is None here)."""

    core: CoreProcess | None = None

    def close(self) -> None:
        """End the child (a model loaded but never given an engine)."""
        if self.core is not None:
            self.core.close(timeout=5)


def launch_core(load, *args, torch_threads: int | None = None, **kwargs) -> RemoteModel:
    """``load(*args, **kwargs)`` (a LoadedModel) run in a new engine core process; blocks until it
    has loaded. ``load`` must be importable by name (a module-level function)."""
    core = CoreProcess(load, args, kwargs, torch_threads)
    try:
        info = core.expect("loaded")[1]
    except BaseException:
        core.close(timeout=5)
        raise
    return RemoteModel(**{f.name: getattr(info, f.name) for f in dataclasses.fields(info)}, core=core)


def load_model_in_core(spec: str | None = None, **kwargs) -> RemoteModel:
    """engine.loader.load_model(spec, **kwargs), in an engine core process."""
    return launch_core(load_model, spec, **kwargs)


class _Handle:
    """A request as the server process knows it: what EventStream holds as its ``_seq``."""

    __slots__ = ("key", "sink", "finished", "_aborted", "_outbox")

    def __init__(self, key: int, sink, outbox):
        self.key, self.sink, self._outbox = key, sink, outbox
        self.finished = self._aborted = False

    @property
    def aborted(self) -> bool:
        return self._aborted

    @aborted.setter
    def aborted(self, value: bool) -> None:
        # also set from EventStream.__del__: SimpleQueue.put is safe there (reentrant)
        if value and not self._aborted and not self.finished:
            self._aborted = True
            self._outbox.put(("abort", self.key))


class RemoteEngine(PromptAPI):
    """An Engine's public surface, over a pipe to the engine core process."""

    def __init__(self, loaded: RemoteModel, config: EngineConfig | None = None):
        self.loaded, self.core = loaded, loaded.core
        self.tokenizer = loaded.tokenizer
        self.model_name, self.device, self.max_model_len = loaded.name, loaded.device, loaded.max_model_len
        self.prompts = PromptRenderer(self.tokenizer, loaded.processor)
        self.texts = TokenTexts(self.tokenizer)
        self._constraints = None
        try:
            self.core.send([("engine", dataclasses.replace(config) if config else EngineConfig())])
            facts = self.core.expect("started")[1]
        except BaseException:
            self.core.close(timeout=5)
            raise
        self.config: EngineConfig = facts["config"]  # with the defaults the engine filled in
        self.vocab_size, self.eos_ids = facts["vocab_size"], facts["eos_ids"]
        self.packed, self.accepts_images, self.core_pid = facts["packed"], facts["accepts_images"], facts["pid"]
        self._lock = threading.Lock()
        self._open: dict[int, _Handle] = {}
        self._keys = itertools.count()
        self._ckeys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # CompiledConstraint -> ckey
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._counts = (0, 0)  # the core's running and waiting, as of its last message
        self._core_stats: dict = {}
        self._local_stats: defaultdict = defaultdict(int)
        self._threads: list[threading.Thread] = []
        self._gone: str | None = None  # why the core is gone
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> RemoteEngine:
        for target, name in ((self._read, "chatserve-core-reader"), (self._write, "chatserve-core-writer")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Stop the core: what is open ends with "server is shutting down"; the child exits."""
        if not self._stopping:
            self._stopping = True
            self._outbox.put(("stop",))
            self._outbox.put(None)  # the writer's last item
            if not self._threads:  # never started: nobody writes
                self.core.close(timeout=40)
        self.core.end(40)  # stuck: killed, no more asking (a send could block on a full pipe)
        self.core.hang_up()  # wakes the reader if the pipe is somehow still open
        for t in self._threads:
            t.join(timeout=10)

    @property
    def alive(self) -> bool:
        return bool(self._threads) and self._gone is None and not self._stopping and self.core.running()

    @property
    def scores_prompts(self) -> bool:
        return self.packed

    @property
    def num_running(self) -> int:
        return min(self._counts[0], len(self._open))

    @property
    def num_waiting(self) -> int:
        return len(self._open) - self.num_running

    @property
    def stats(self) -> dict:
        merged = dict(self._core_stats)
        for k, v in self._local_stats.items():
            merged[k] = merged.get(k, 0) + v
        return merged

    # ------------------------------------------------------------------ public API
    def generate(self, request: GenerationRequest) -> EventStream:
        """As Engine.generate: an async stream of TokenEvents, submitted when first awaited."""
        return EventStream(self, request)

    def _submit(self, request: GenerationRequest, sink) -> _Handle:
        with self._lock:
            if self._gone is not None or self._stopping or not self._threads:
                raise RuntimeError("engine is not running")
            cfg = self.config
            if len(self._open) >= cfg.max_running + cfg.max_waiting:
                self._local_stats["rejected"] += 1
                raise EngineOverloaded(
                    f"server is at capacity ({cfg.max_running} running, {cfg.max_waiting} waiting); retry later",
                    retry_after=1 if self._counts[0] == 0 else 2,
                )
            key = next(self._keys)
            handle = self._open[key] = _Handle(key, sink, self._outbox)
            ref = None
            if request.constraint is not None:  # a ConstraintState, fresh: the core makes its own
                ref = self._constraint_ref(request.constraint.c)
                request = dataclasses.replace(request, constraint=None)
            self._outbox.put(("submit", key, request, ref))  # in order: a constraint's fields come first
        return handle

    def _constraint_ref(self, compiled) -> tuple:
        ckey = self._ckeys.get(compiled)
        if ckey is not None:
            return ckey, None
        ckey = self._ckeys[compiled] = next(self._keys)
        weakref.finalize(compiled, self._outbox.put, ("forget", ckey)).atexit = False
        return ckey, pack_constraint(compiled)

    def abort(self, handle: _Handle) -> None:
        handle.aborted = True

    # ------------------------------------------------------------------ the pipe
    def _write(self) -> None:
        while True:
            batch = [self._outbox.get()]
            while True:
                try:
                    batch.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            commands = [c for c in batch if c is not None]
            try:
                if commands:
                    self.core.send(commands)
            except OSError:  # the core is gone; the reader fails what is open
                return
            if len(commands) < len(batch):
                return

    def _read(self) -> None:
        conn = self.core.conn
        while True:
            try:
                msg = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                break
            if msg[0] != "step":
                continue
            _, events, running, waiting, stats = msg
            self._counts = (running, waiting)
            if stats is not None:
                self._core_stats = stats
            out = []
            for t in events:
                handle = self._open.get(t[0])
                if handle is None:
                    continue
                ev = unpack_event(t)
                if ev.finish_reason is not None:
                    handle.finished = True
                    with self._lock:
                        self._open.pop(handle.key, None)
                out.append((handle, ev))
            deliver(out)
        self._core_gone()

    def _core_gone(self) -> None:
        self.core.process.join(5)
        code = self.core.process.exitcode
        if self._stopping:
            reason = "server is shutting down"
        else:
            reason = f"internal error: the engine core process exited unexpectedly (exit code {code})"
            log.error("%s; failing %d open requests", reason, len(self._open))
        with self._lock:
            self._gone = reason
            victims = list(self._open.values())
            self._open.clear()
        for h in victims:
            h.finished = True
        deliver([(h, TokenEvent(text="", token_ids=[], finish_reason="error", error=reason)) for h in victims])
        self._outbox.put(None)  # the writer ends too


__all__ = ["RemoteEngine", "RemoteModel", "launch_core", "load_model_in_core"]
