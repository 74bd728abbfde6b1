"""Chat template rendering: messages (plain dicts) -> prompt token ids."""
from __future__ import annotations

import json

from .tools import default_tool_prompt, detect_family, get_format, template_supports_tools


class PromptError(ValueError):
    """The messages cannot be rendered for this model (maps to HTTP 400)."""

    def __init__(self, message: str, param: str | None = "messages"):
        super().__init__(message)
        self.param = param


def _text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content if part.get("type") == "text")


def call_as_text(call: dict, family: str) -> str:
    """An assistant tool call from the history, written the way the model writes calls."""
    fmt = get_format(family)
    fn = call.get("function", {})
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    body = json.dumps({"name": fn.get("name"), fmt.args_key: args}, ensure_ascii=False)
    if fmt.close_tag:
        return f"{fmt.open_tags[0]}\n{body}\n{fmt.close_tag}"
    return body


class PromptRenderer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.template = getattr(tokenizer, "chat_template", None)
        self.family = detect_family(tokenizer)
        self.template_tools = template_supports_tools(tokenizer)

    @property
    def has_template(self) -> bool:
        return bool(self.template)

    def normalize(self, messages: list[dict]) -> list[dict]:
        """Flatten text parts to strings (most templates concatenate content as a string).

        For templates that know nothing of tools, assistant tool calls in the history become
        text in the model's call format and tool results stay messages of role "tool".
        """
        out = []
        for m in messages:
            m = dict(m)
            m["content"] = _text_of(m.get("content"))
            if m.get("tool_calls") and not self.template_tools:
                calls = "\n".join(call_as_text(c, self.family) for c in m.pop("tool_calls"))
                m["content"] = (m["content"] + "\n" if m["content"] else "") + calls
            elif m.get("tool_calls"):
                calls = []
                for c in m["tool_calls"]:
                    fn = dict(c.get("function", {}))
                    # templates that loop over tool_calls expect arguments as a mapping
                    if isinstance(fn.get("arguments"), str):
                        try:
                            fn["arguments"] = json.loads(fn["arguments"])
                        except json.JSONDecodeError:
                            pass
                    calls.append({**c, "function": fn})
                m["tool_calls"] = calls
            out.append(m)
        return out

    def with_tools(self, messages: list[dict], tools: list[dict] | None, tool_prompt: str | None):
        """Messages plus the tool text to put in the system message, and the template's tools kwarg.

        A template that renders tools gets them (OpenAI shape); otherwise the tool definitions and
        the instructions (``tool_prompt`` overrides the default wording) go into the system
        message. A tool_prompt given with a tool-aware template is added to the system message.
        """
        if not tools:
            return messages, {}
        if self.template_tools:
            kwargs = {"tools": [{"type": "function", "function": t} for t in tools]}
            text = tool_prompt
        else:
            kwargs = {}
            text = default_tool_prompt(tools, self.family, instructions=tool_prompt)
        if text:
            if messages and messages[0].get("role") == "system":
                first = dict(messages[0])
                first["content"] = _text_of(first.get("content")) + "\n\n" + text
                messages = [first] + messages[1:]
            else:
                messages = [{"role": "system", "content": text}] + messages
        return messages, kwargs

    def render_text(self, messages: list[dict], *, tools: list[dict] | None = None,
                    tool_prompt: str | None = None, add_generation_prompt: bool = True) -> str:
        if not self.has_template:
            raise PromptError("this model has no chat template, so chat messages cannot be rendered; "
                              "serve a chat/instruct model or one whose tokenizer defines chat_template")
        messages, kwargs = self.with_tools(messages, tools, tool_prompt)
        try:
            return self.tokenizer.apply_chat_template(self.normalize(messages), tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **kwargs)
        except Exception as exc:  # jinja raise_exception() in templates, e.g. role alternation rules
            raise PromptError(f"the model's chat template rejected the messages: {exc}") from exc

    def render(self, messages: list[dict], *, tools: list[dict] | None = None, tool_prompt: str | None = None,
               add_generation_prompt: bool = True) -> list[int]:
        text = self.render_text(messages, tools=tools, tool_prompt=tool_prompt,
                                add_generation_prompt=add_generation_prompt)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:   # e.g. a lone surrogate from a "\\ud800" JSON escape
            raise PromptError(f"message text is not valid Unicode: {exc.reason} at position {exc.start}") from None
        # The template already wrote any BOS it wants; don't let the tokenizer add another.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
