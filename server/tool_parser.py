"""Tool calls in generated text, parsed as they stream: content, call starts, argument fragments.

How each model family writes a call (its open and close tags, bare JSON at the start, separators)
is ``engine.tools``' data (``ToolFormat``); this module reads replies written that way. It is the
server's: the engine constrains what is generated and never parses it back.
``server.toolcalls`` frames the events it returns as OpenAI's ``message.tool_calls`` and streamed
``tool_calls`` deltas.

Arguments: the ``arguments`` string of a parsed call is the JSON text of the arguments value
*exactly as generated* (a slice of the output), both in :func:`parse_tool_calls` and in the
fragments of :class:`ToolCallStreamParser` -- ``parse_tool_calls`` is built on the stream parser,
so the two can never disagree. (One exception, identical in both: when a model writes the
arguments as a JSON *string* holding JSON, that string is decoded.)

The event types and :func:`collect_events` live in ``server.tool_events``, the scanner of one call
object in ``server.call_scanner``; both are re-exported here.
"""

from __future__ import annotations

import json

from engine.tools import get_format

from .call_scanner import _P_VSCALAR, _P_VSTR, _WS, _CallScanner
from .tool_events import CallArgs, CallEnd, CallStart, Content, ToolEvent, collect_events

__all__ = [
    "Content",
    "CallStart",
    "CallArgs",
    "CallEnd",
    "ToolEvent",
    "ToolCallStreamParser",
    "collect_events",
    "parse_tool_calls",
]


class ToolCallStreamParser:
    """Incremental tool-call parser for one generated reply.

    ``feed(text_delta)`` returns a list of events:
      Content(text) | CallStart(index, name) | CallArgs(index, fragment) | CallEnd(index)
    and ``finish()`` flushes what is held back at the end of the reply.

    The ``CallArgs`` fragments of a call concatenate to exactly the ``arguments`` string
    :func:`parse_tool_calls` returns (it is implemented with this class). Text that might
    still become a call opener (e.g. a trailing ``"<tool"``) is held back until decided;
    whitespace between content and a call, between calls and after the last call is
    dropped. A call whose opener is not followed by a well-formed call header is
    released as content. A call truncated by the end of the reply is still reported
    (name + partial arguments) -- the constraint engine prevents that except on
    max_tokens; one cut off before its name, or inside its close tag, leaves nothing
    in the content.
    """

    def __init__(self, family: str = "generic"):
        self.fmt = get_format(family)
        self._buf = ""  # undecided text in content mode
        self._held_ws = ""  # trailing whitespace of content, released lazily
        self._at_start = True  # nothing but whitespace seen (bare JSON allowed)
        self._after_call = False  # right after a call: skip whitespace / separators
        self._ncalls = 0
        self._call: _CallScanner | None = None
        self._call_raw_prefix = ""  # opener text (released as content if the call aborts)
        self._started = False  # CallStart emitted for the current call
        self._args_emitted = 0  # chars of args text already emitted; -1: a string value, released whole
        self._closing = False  # object done, waiting for the close tag
        self._close_buf = ""
        self._content_seen = False
        self._pre_call_ws = ""  # whitespace dropped before the current call's opener

    # -- content handling ----------------------------------------------------------
    def _content(self, text: str, out: list[ToolEvent]) -> None:
        if not text:
            return
        if self._after_call:
            text = text.lstrip(_WS)
            if not text:
                return
            self._after_call = False
        combined = self._held_ws + text
        body = combined.rstrip(_WS)
        self._held_ws = combined[len(body) :]
        if body:
            out.append(Content(body))
            self._content_seen = True

    def _step_content(self, out: list[ToolEvent]) -> bool:
        """Process self._buf in content mode; return True if a call began."""
        fmt = self.fmt
        buf = self._buf
        if self._after_call:
            stripped = buf.lstrip(_WS + fmt.separator_chars)
            if not stripped:
                self._buf = ""
                return False
            buf = stripped
            if fmt.bare_json_at_start and buf.startswith("{"):
                self._after_call = False
                self._buf = buf
                self._begin_call("", out)
                return True
        start_only = fmt.triggers_at_start_only
        if start_only:
            if not (self._at_start or self._after_call):
                self._content(buf, out)
                self._buf = ""
                return False
            s = buf.lstrip(_WS)
            if not s:
                self._buf = buf
                return False
            if fmt.bare_json_at_start and s.startswith("{"):
                self._at_start = self._after_call = False
                self._buf = s
                self._begin_call("", out)
                return True
            for tag in fmt.open_tags:
                if s.startswith(tag):
                    self._at_start = self._after_call = False
                    self._buf = s[len(tag) :]
                    self._begin_call(tag, out)
                    return True
                if tag.startswith(s):
                    self._buf = buf
                    return False  # undecided
            self._at_start = False
            self._content(buf, out)
            self._buf = ""
            return False
        # anywhere openers
        found = None
        for tag in fmt.open_tags:
            j = buf.find(tag)
            if j >= 0 and (found is None or j < found[0]):
                found = (j, tag)
        if found is not None:
            j, tag = found
            self._content(buf[:j], out)
            self._pre_call_ws = self._held_ws
            self._held_ws = ""  # whitespace right before a call is dropped
            self._after_call = False
            self._buf = buf[j + len(tag) :]
            self._begin_call(tag, out)
            return True
        keep = 0
        for tag in fmt.open_tags:
            for k in range(min(len(buf), len(tag) - 1), 0, -1):
                if tag.startswith(buf[-k:]):
                    keep = max(keep, k)
                    break
        self._content(buf[: len(buf) - keep], out)
        self._buf = buf[len(buf) - keep :]
        return False

    # -- call handling -------------------------------------------------------------
    def _begin_call(self, opener: str, out: list[ToolEvent]) -> None:
        self._call = _CallScanner()
        self._call_raw_prefix = opener
        self._started = False
        self._args_emitted = 0
        self._closing = False
        self._close_buf = ""
        self._at_start = False

    def _abort_call(self, out: list[ToolEvent]) -> None:
        """Opener not followed by a well-formed call: release the text as content."""
        call = self._call
        self._call = None
        # the opener is content; what followed it is scanned again (it may hold a call)
        self._held_ws, self._pre_call_ws = self._held_ws + self._pre_call_ws, ""
        self._content(self._call_raw_prefix, out)
        self._buf = call.text + self._buf
        if not self._call_raw_prefix and call.text:
            # a bare '{' that is not a call: release it so scanning makes progress
            self._content(self._buf[0], out)
            self._buf = self._buf[1:]

    def _args_text(self, call: _CallScanner, end: int) -> str:
        return call.text[call.args_start if call.args_start is not None else call.vstart : end]

    def _pump_call(self, out: list[ToolEvent], final: bool = False) -> None:
        call = self._call
        idx = self._ncalls
        if not self._started:
            if call.name is not None and not call.error:
                self._started = True
                out.append(CallStart(idx, call.name))
            elif final and not call.done and not call.error and self._call_raw_prefix:
                # an opener and the start of a well-formed header, cut off by the end of the reply
                # (max_tokens): an unfinished call, not text the model meant to say
                self._call = None
                self._pre_call_ws = ""
                return
            elif call.error or (final and not call.done) or (call.done and call.name is None):
                self._abort_call(out)
                return
        if self._started:
            # stream argument text
            if call.args_start is not None and call.args_is_str:
                if self._args_emitted == 0:
                    raw = call.text[call.args_start : call.args_end]
                    try:
                        frag = json.loads(raw)
                        if not isinstance(frag, str):
                            frag = raw
                    except ValueError:
                        frag = raw
                    if frag:
                        out.append(CallArgs(idx, frag))
                    self._args_emitted = -1  # released whole
            elif self._args_emitted >= 0:
                end = call.args_streamable_end()
                if final and end is None and call.cur_key_is_args and call.phase in (_P_VSCALAR, _P_VSTR):
                    end = len(call.text)
                if end is not None:
                    start = call.args_start if call.args_start is not None else call.vstart
                    cur = start + self._args_emitted
                    if end > cur:
                        out.append(CallArgs(idx, call.text[cur:end]))
                        self._args_emitted = end - start
            if call.error and not call.done:
                # committed call went bad (only possible without a constraint): end it here
                self._finish_call(out)
                return
            if call.done:
                self._closing = True

    def _finish_call(self, out: list[ToolEvent]) -> None:
        idx = self._ncalls
        if self._started and self._args_emitted == 0:
            out.append(CallArgs(idx, "{}"))
        out.append(CallEnd(idx))
        self._pre_call_ws = ""
        rest = self._call.text[self._call.pos :] if self._call is not None else ""
        self._ncalls += 1
        self._call = None
        self._closing = False
        self._after_call = True
        self._held_ws = ""
        self._buf = rest + self._buf

    def _step_call(self, out: list[ToolEvent], final: bool = False) -> bool:
        """Returns True if the call finished (so content processing may continue)."""
        call = self._call
        if not self._closing:
            if self._buf:
                call.feed(self._buf)
                self._buf = ""
            self._pump_call(out, final)
            if self._call is None:  # aborted
                return True
            if call.error and not self._started:
                return True
            if not self._closing:
                return False
            # object complete: whatever was scanned past the brace goes to close handling
            self._close_buf = call.text[call.pos :]
            call.text = call.text[: call.pos]
        tag = self.fmt.close_tag
        if not tag:
            self._buf = self._close_buf + self._buf
            self._close_buf = ""
            self._finish_call(out)
            return True
        self._close_buf += self._buf
        self._buf = ""
        s = self._close_buf.lstrip(_WS)
        if s.startswith(tag):
            self._close_buf = ""
            self._buf = s[len(tag) :]
            self._finish_call(out)
            return True
        if tag.startswith(s):
            if not final:
                return False  # undecided (e.g. "</tool_")
            self._close_buf = ""  # the reply ended inside the close tag (max_tokens): drop it
            self._finish_call(out)
            return True
        self._buf = self._close_buf
        self._close_buf = ""
        self._finish_call(out)
        return True

    # -- public --------------------------------------------------------------------
    def feed(self, text: str) -> list[ToolEvent]:
        out: list[ToolEvent] = []
        if text:
            self._buf += text
        self._process(out, final=False)
        return out

    def _process(self, out: list[ToolEvent], final: bool) -> None:
        for _ in range(1_000_000):
            if self._call is not None:
                if not self._step_call(out, final):
                    return
                continue
            if not self._buf:
                return
            if not self._step_content(out):
                return

    def finish(self) -> list[ToolEvent]:
        out: list[ToolEvent] = []
        self._process(out, final=True)
        if self._call is not None:
            self._step_call(out, final=True)
            if self._call is not None:
                if self._started:
                    self._pump_call(out, final=True)
                    if self._call is not None:
                        self._finish_call(out)
                else:
                    self._abort_call(out)
            self._process(out, final=True)
        if self._buf:
            # undecided opener prefix at the very end: it is content
            buf, self._buf = self._buf, ""
            if self._after_call:
                buf = buf.lstrip(_WS + self.fmt.separator_chars)
            self._content(buf, out)
        if self._held_ws and self._ncalls == 0 and self._content_seen:
            out.append(Content(self._held_ws))
        self._held_ws = ""
        return out


def parse_tool_calls(text: str, family: str = "generic") -> tuple[str | None, list[dict]]:
    """Extract tool calls from a complete generated reply.

    Returns (content, calls): content is the text outside the calls (None if empty);
    calls is a list of {"name": str, "arguments": str (JSON text as generated)}.
    Text that merely looks like an opener but is not followed by a call header stays
    content.
    """
    p = ToolCallStreamParser(family)
    events = p.feed(text) + p.finish()
    return collect_events(events)
