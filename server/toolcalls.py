"""Tool calls in the output -> OpenAI's message.tool_calls and streamed tool_calls deltas.

The parsing is tool_parser's (per model family, with engine.tools' formats); this module only
frames its events for the wire.
"""

from __future__ import annotations

import secrets

from .protocol import Delta, FunctionDelta, ToolCallDelta
from .tool_parser import CallArgs, CallStart, Content, ToolCallStreamParser, parse_tool_calls

__all__ = ["ToolCallFramer", "new_call_id", "parse_tool_calls"]


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ToolCallFramer:
    """Feeds generated text to the family's stream parser and returns OpenAI deltas.

    The first delta of a call carries index, id, type, function.name and arguments ""; later
    deltas carry the index and argument fragments, which concatenate to the full arguments JSON.
    """

    def __init__(self, family: str):
        self.parser = ToolCallStreamParser(family)
        self.count = 0

    def feed(self, text: str, final: bool = False) -> list[Delta]:
        events = self.parser.feed(text) if text else []
        if final:
            events += self.parser.finish()
        deltas: list[Delta] = []
        for ev in events:
            if isinstance(ev, Content):
                if ev.text:
                    deltas.append(Delta(content=ev.text))
            elif isinstance(ev, CallStart):
                self.count += 1
                deltas.append(
                    Delta(
                        tool_calls=[
                            ToolCallDelta(
                                index=ev.index,
                                id=new_call_id(),
                                type="function",
                                function=FunctionDelta(name=ev.name, arguments=""),
                            )
                        ]
                    )
                )
            elif isinstance(ev, CallArgs) and ev.fragment:
                deltas.append(
                    Delta(tool_calls=[ToolCallDelta(index=ev.index, function=FunctionDelta(arguments=ev.fragment))])
                )
        return deltas
