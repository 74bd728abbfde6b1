"""The events :class:`server.tool_parser.ToolCallStreamParser` returns, and their fold.

``Content`` (text outside any call), ``CallStart`` (a call began, with its name), ``CallArgs``
(the next piece of its arguments JSON text), ``CallEnd`` (it is complete); :func:`collect_events`
folds a stream of them into (content, calls), the shape :func:`server.tool_parser.parse_tool_calls`
returns.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Content", "CallStart", "CallArgs", "CallEnd", "ToolEvent", "collect_events"]


@dataclass(frozen=True, slots=True)
class Content:
    """Text outside any call."""

    text: str


@dataclass(frozen=True, slots=True)
class CallStart:
    """Call number ``index`` (0, 1, ... in the reply) began and names ``name``."""

    index: int
    name: str


@dataclass(frozen=True, slots=True)
class CallArgs:
    """The next piece of call ``index``'s arguments JSON text."""

    index: int
    fragment: str


@dataclass(frozen=True, slots=True)
class CallEnd:
    """Call ``index`` is complete."""

    index: int


ToolEvent = Content | CallStart | CallArgs | CallEnd


def collect_events(events: Iterable[ToolEvent]) -> tuple[str | None, list[dict]]:
    """Fold parser events into (content or None, [{"name", "arguments"}])."""
    content: list[str] = []
    calls: dict[int, dict] = {}
    for ev in events:
        if isinstance(ev, Content):
            content.append(ev.text)
        elif isinstance(ev, CallStart):
            calls[ev.index] = {"name": ev.name, "arguments": ""}
        elif isinstance(ev, CallArgs):
            calls[ev.index]["arguments"] += ev.fragment
    text = "".join(content)
    return (text if text else None), [calls[i] for i in sorted(calls)]
