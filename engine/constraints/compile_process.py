"""One compile worker process as the parent sees it, and the errors a task on it can end in.

:class:`_Worker` starts the process (a fresh interpreter running
:func:`engine.constraints.compile_child._child_main`), sends it tasks with a deadline, and kills it
(SIGKILL) when the deadline passes. The pool that hands workers out is
:mod:`engine.constraints.compile_pool`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict

log = logging.getLogger("chatserve.engine.compile")

# the folder that holds the engine package (engine/constraints/compile_process.py -> three levels up)
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
