"""A request's events, from the engine thread to the asyncio loop that awaits them."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .request import GenerationRequest, TokenEvent
from .scheduler import Sequence

if TYPE_CHECKING:
    from .engine import Engine


def deliver(out: list[tuple[Sequence, TokenEvent]]) -> None:
    """Hand a step's events to their event loops: one thread-safe call per loop per step."""
    by_loop: dict = {}
    for seq, event in out:
        loop, queue = seq.sink
        by_loop.setdefault(loop, []).append((queue, event))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class EventStream:
    """One request's events as the engine thread delivers them (an async iterator).

    ``ready()`` also hands over, without waiting, the events already delivered: a consumer that
    fell a few steps behind (a busy front end) catches up in one go instead of one await each.
    """

    def __init__(self, engine: Engine, request: GenerationRequest):
        self._engine, self._request = engine, request
        self._queue: asyncio.Queue[TokenEvent] | None = None
        self._seq: Sequence | None = None
        self._done = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._seq = self._engine._submit(self._request, (asyncio.get_running_loop(), self._queue))
        event = await self._queue.get()
        self._done = event.finish_reason is not None
        return event

    def ready(self) -> list[TokenEvent]:
        out: list[TokenEvent] = []
        while not self._done and self._queue is not None and not self._queue.empty():
            out.append(self._queue.get_nowait())
            self._done = out[-1].finish_reason is not None
        return out

    async def aclose(self) -> None:
        self._done = True
        if self._seq is not None and not self._seq.finished:
            self._engine.abort(self._seq)

    def __del__(self):  # dropped without being closed: the request must not run on for nobody
        seq = getattr(self, "_seq", None)
        if seq is not None and not seq.finished and not seq.aborted:
            seq.aborted = True


def _put_all(items) -> None:
    for queue, event in items:
        queue.put_nowait(event)
