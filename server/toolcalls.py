"""Tool calls in the output -> OpenAI's message.tool_calls and streamed tool_calls deltas.

The parsing is engine.tools' (per model family); this module only frames it for the wire.
"""
from __future__ import annotations

import secrets

from engine.tools import ToolCallStreamParser, parse_tool_calls

from .protocol import Delta, FunctionDelta, ToolCallDelta

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
            if ev[0] == "content":
                if ev[1]:
                    deltas.append(Delta(content=ev[1]))
            elif ev[0] == "call_start":
                self.count += 1
                deltas.append(Delta(tool_calls=[ToolCallDelta(index=ev[1], id=new_call_id(), type="function",
                                                              function=FunctionDelta(name=ev[2], arguments=""))]))
            elif ev[0] == "args" and ev[2]:
                deltas.append(Delta(tool_calls=[ToolCallDelta(index=ev[1], function=FunctionDelta(arguments=ev[2]))]))
        return deltas
