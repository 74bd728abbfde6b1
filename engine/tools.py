"""Per-family tool-call text formats: what the prompt says and what the constraint allows.

A *family* is how a model writes a tool call in plain text:

* ``hermes``  (Qwen2.5 / Qwen3 / Hermes)::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

* ``llama3`` (Llama 3.1 / 3.2 JSON tool calling): a bare JSON object at the start of the
  reply, optionally after ``<|python_tag|>``; the arguments live under ``"parameters"``;
  several calls are separated by ``;``::

      {"name": "get_weather", "parameters": {"city": "Paris"}}

* ``generic``: the default for chat templates without tool support (e.g. SmolLM2). Same
  text as hermes; the engine's prompt code puts :func:`default_tool_prompt` into the
  system message.

Adding a family is one :class:`ToolFormat` entry in :data:`FAMILIES` (plus a marker in
:func:`detect_family` if it can be recognised from the chat template).

Reading calls back out of generated text is the server's job (``server/tool_parser.py`` reads
the text side of these formats); the engine only writes the prompt and the constraint.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

__all__ = [
    "ToolFormat",
    "FAMILIES",
    "get_format",
    "detect_family",
    "template_supports_tools",
    "normalize_tools",
    "default_tool_prompt",
]


@dataclass(frozen=True)
class ToolFormat:
    """How one family writes tool calls.

    Text side (what server/tool_parser.py reads back):
      open_tags: texts that open a call; the call's JSON object follows (after optional
        whitespace). Empty for families that write bare JSON.
      close_tag: text after the JSON object ("" = none).
      bare_json_at_start: a ``{`` as the first non-space character of the reply (or right
        after a previous call) starts a call.
      separator_chars: characters skipped between consecutive calls (besides whitespace).
      args_key: the key holding the arguments ("arguments" / "parameters"); the parser
        accepts either key for every family.

    Constraint side (regex fragments in the Rust ``regex`` syntax outlines_core uses):
      first_prefix_re: once, before the first call; prefix_re / suffix_re: around each
      call; repeat_sep_re: after each call when several are allowed (must be optional:
      the calls are compiled as ``(prefix CALL suffix repeat_sep)+`` so the call regex
      appears once in the automaton); trailing_re: after a single call.
      triggers: texts that, in tool_choice="auto", switch free text to a constrained
        call (each must be a prefix of what ``first_prefix_re`` + ``{`` accepts);
        triggers_at_start_only: they only count as the first non-space text of the reply.

    Prompt side: instructions (overridable) and format_hint (always appended).
    """

    family: str
    args_key: str
    open_tags: tuple[str, ...]
    close_tag: str
    bare_json_at_start: bool
    separator_chars: str
    first_prefix_re: str
    prefix_re: str
    suffix_re: str
    repeat_sep_re: str
    trailing_re: str
    triggers: tuple[str, ...]
    triggers_at_start_only: bool
    instructions: str
    format_hint: str
    tag_tokens: tuple[str, ...] = field(default=())  # single tokens the call syntax uses


_HERMES_INSTRUCTIONS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:"
)
_HERMES_HINT = (
    "For each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def _hermes_like(family: str) -> ToolFormat:
    return ToolFormat(
        family=family,
        args_key="arguments",
        open_tags=("<tool_call>",),
        close_tag="</tool_call>",
        bare_json_at_start=False,
        separator_chars="",
        first_prefix_re="",
        prefix_re=r"<tool_call>\n?",
        suffix_re=r"\n?</tool_call>",
        repeat_sep_re=r"\n?",
        trailing_re=r"\n?",
        triggers=("<tool_call>",),
        triggers_at_start_only=False,
        instructions=_HERMES_INSTRUCTIONS,
        format_hint=_HERMES_HINT,
        tag_tokens=("<tool_call>", "</tool_call>"),
    )


FAMILIES: dict[str, ToolFormat] = {
    "hermes": _hermes_like("hermes"),
    "generic": _hermes_like("generic"),
    "llama3": ToolFormat(
        family="llama3",
        args_key="parameters",
        open_tags=("<|python_tag|>",),
        close_tag="",
        bare_json_at_start=True,
        separator_chars=";",
        first_prefix_re=r"(<\|python_tag\|>)?",
        prefix_re="",
        suffix_re="",
        repeat_sep_re=r"(; ?)?",
        trailing_re="",
        triggers=("<|python_tag|>", "{"),
        triggers_at_start_only=True,
        instructions=(
            "Given the following functions, please respond with a JSON for a function call "
            "with its proper arguments that best answers the given prompt. "
            "Do not use variables."
        ),
        format_hint=(
            'Respond in the format {"name": function name, "parameters": dictionary of '
            "argument name and its value}. To call several functions, separate the JSON "
            "objects with '; '."
        ),
        tag_tokens=("<|python_tag|>",),
    ),
}


def get_format(family: str) -> ToolFormat:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown tool-call family {family!r} (known: {', '.join(sorted(FAMILIES))})") from None


def _template_text(tokenizer) -> str:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):  # named templates
        return "\n".join(str(v) for v in tpl.values())
    if isinstance(tpl, (list, tuple)):  # [{"name":..., "template":...}]
        return "\n".join(str(t.get("template", "")) if isinstance(t, dict) else str(t) for t in tpl)
    return tpl or ""


def detect_family(tokenizer) -> str:
    """Family from the chat template text: '<tool_call>' -> hermes,
    'python_tag' / 'ipython' -> llama3, anything else -> generic."""
    text = _template_text(tokenizer)
    if "<tool_call>" in text:
        return "hermes"
    if "python_tag" in text or "ipython" in text:
        return "llama3"
    return "generic"


_TOOLS_REF = re.compile(r"\btools\b")


def template_supports_tools(tokenizer) -> bool:
    """True when the chat template references a ``tools`` variable."""
    return bool(_TOOLS_REF.search(_template_text(tokenizer)))


def normalize_tools(tools) -> list[dict]:
    """Accept {"name","description","parameters"} dicts or the OpenAI wire shape
    {"type":"function","function":{...}}; return the flat shape."""
    out = []
    for t in tools or []:
        if isinstance(t, dict) and isinstance(t.get("function"), dict):
            t = t["function"]
        if not isinstance(t, dict):
            raise ValueError(f"tool definition must be an object, got {type(t).__name__}")
        out.append(t)
    return out


def default_tool_prompt(tools, family: str = "generic", instructions: str | None = None) -> str:
    """System-prompt text describing the tools: instructions (``instructions`` overrides
    the family default), the JSON definitions, and the family's call-format hint."""
    fmt = get_format(family)
    defs = []
    for t in normalize_tools(tools):
        fn = {"name": t.get("name")}
        if t.get("description"):
            fn["description"] = t["description"]
        fn["parameters"] = t.get("parameters") or {"type": "object", "properties": {}}
        defs.append(json.dumps({"type": "function", "function": fn}, ensure_ascii=False))
    head = instructions if instructions is not None else fmt.instructions
    if fmt.open_tags == ("<tool_call>",):
        body = "<tools>\n" + "\n".join(defs) + "\n</tools>"
    else:
        body = "\n\n".join(defs)
    return f"{head}\n\n{body}\n\n{fmt.format_hint}"
