"""Scanning one tool-call object ``{"name": ..., "arguments": ...}`` character by character.

The scanner keeps the raw text so the arguments value can be sliced exactly as generated, and
says how much of it is certainly final while it streams. :mod:`server.tool_parser` drives it.
"""

from __future__ import annotations

import json

_WS = " \t\r\n"

# phases of the call-object scanner
_P_OPEN, _P_KEY, _P_KEYSTR, _P_COLON, _P_VALUE, _P_VSTR, _P_VCONT, _P_VSCALAR, _P_AFTER = range(9)


class _CallScanner:
    """Scans one call object ``{"name": ..., "arguments": ...}`` character by character.

    Keeps the raw text so values can be sliced exactly as generated. Only the top level
    is interpreted; nested values are tracked by bracket depth with string awareness.
    """

    __slots__ = (
        "text",
        "pos",
        "phase",
        "key",
        "key_start",
        "vstart",
        "depth",
        "in_str",
        "esc",
        "name",
        "args_start",
        "args_end",
        "args_is_str",
        "error",
        "done",
        "cur_key_is_args",
    )

    def __init__(self):
        self.text = ""
        self.pos = 0
        self.phase = _P_OPEN
        self.key = None
        self.key_start = 0
        self.vstart = 0
        self.depth = 0
        self.in_str = False
        self.esc = False
        self.name = None  # decoded name once its value string completed
        self.args_start = None  # slice of the arguments value in self.text
        self.args_end = None
        self.args_is_str = False
        self.error = False
        self.done = False  # closing brace of the object seen (self.pos is after it)
        self.cur_key_is_args = False

    def feed(self, s: str) -> None:
        self.text += s
        self._run()

    def _end_value(self, end: int) -> None:
        start = self.vstart
        if self.key == "name":
            try:
                v = json.loads(self.text[start:end])
            except ValueError:
                v = None
            if isinstance(v, str) and self.name is None:
                self.name = v
            elif self.name is None:
                self.error = True
        elif self.cur_key_is_args and self.args_start is None:
            self.args_start, self.args_end = start, end
        self.phase = _P_AFTER

    def _run(self) -> None:
        t = self.text
        n = len(t)
        i = self.pos
        while i < n and not self.error and not self.done:
            c = t[i]
            ph = self.phase
            if ph == _P_OPEN:
                if c in _WS:
                    pass
                elif c == "{":
                    self.phase = _P_KEY
                else:
                    self.error = True
                    break
            elif ph == _P_KEY:
                if c in _WS or c == ",":
                    pass
                elif c == '"':
                    self.phase = _P_KEYSTR
                    self.key_start = i
                    self.esc = False
                elif c == "}":
                    self.done = True
                else:
                    self.error = True
                    break
            elif ph == _P_KEYSTR:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    try:
                        self.key = json.loads(t[self.key_start : i + 1])
                    except ValueError:
                        self.error = True
                        break
                    self.cur_key_is_args = self.key in ("arguments", "parameters")
                    self.phase = _P_COLON
            elif ph == _P_COLON:
                if c in _WS:
                    pass
                elif c == ":":
                    self.phase = _P_VALUE
                else:
                    self.error = True
                    break
            elif ph == _P_VALUE:
                if c in _WS:
                    pass
                else:
                    self.vstart = i
                    if self.cur_key_is_args and self.args_start is None:
                        self.args_is_str = c == '"'
                    if c == '"':
                        self.phase = _P_VSTR
                        self.esc = False
                    elif c in "{[":
                        self.phase = _P_VCONT
                        self.depth = 1
                        self.in_str = False
                        self.esc = False
                    elif c in ",}]:":
                        self.error = True
                        break
                    else:
                        self.phase = _P_VSCALAR
            elif ph == _P_VSTR:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self._end_value(i + 1)
            elif ph == _P_VCONT:
                if self.in_str:
                    if self.esc:
                        self.esc = False
                    elif c == "\\":
                        self.esc = True
                    elif c == '"':
                        self.in_str = False
                elif c == '"':
                    self.in_str = True
                elif c in "{[":
                    self.depth += 1
                elif c in "}]":
                    self.depth -= 1
                    if self.depth == 0:
                        self._end_value(i + 1)
            elif ph == _P_VSCALAR:
                if c in _WS or c in ",}":
                    self._end_value(i)
                    continue  # re-read c in _P_AFTER
            elif ph == _P_AFTER:
                if c in _WS:
                    pass
                elif c == ",":
                    self.phase = _P_KEY
                elif c == "}":
                    self.done = True
                else:
                    self.error = True
                    break
            i += 1
        self.pos = i

    # -- what may be streamed as argument text right now
    def args_streamable_end(self) -> int | None:
        """End of the arguments text that is certainly final, or None if arguments
        have not started (or are a string / scalar, which are released whole)."""
        if self.args_start is not None:
            return self.args_end
        if self.cur_key_is_args and self.phase == _P_VCONT:
            return self.pos
        return None
