"""Chat template rendering: messages (plain dicts) -> prompt token ids."""
from __future__ import annotations

import json


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


class PromptRenderer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.template = getattr(tokenizer, "chat_template", None)

    @property
    def has_template(self) -> bool:
        return bool(self.template)

    def normalize(self, messages: list[dict]) -> list[dict]:
        """Flatten text parts to strings (most templates concatenate content as a string)."""
        out = []
        for m in messages:
            m = dict(m)
            m["content"] = _text_of(m.get("content"))
            if m.get("tool_calls"):
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

    def render_text(self, messages: list[dict], *, tools: list[dict] | None = None,
                    add_generation_prompt: bool = True) -> str:
        if not self.has_template:
            raise PromptError("this model has no chat template, so chat messages cannot be rendered; "
                              "serve a chat/instruct model or one whose tokenizer defines chat_template")
        kwargs = {"tools": tools} if tools else {}
        try:
            return self.tokenizer.apply_chat_template(self.normalize(messages), tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **kwargs)
        except Exception as exc:  # jinja raise_exception() in templates, e.g. role alternation rules
            raise PromptError(f"the model's chat template rejected the messages: {exc}") from exc

    def render(self, messages: list[dict], *, tools: list[dict] | None = None,
               add_generation_prompt: bool = True) -> list[int]:
        text = self.render_text(messages, tools=tools, add_generation_prompt=add_generation_prompt)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:   # e.g. a lone surrogate from a "\\ud800" JSON escape
            raise PromptError(f"message text is not valid Unicode: {exc.reason} at position {exc.start}") from None
        # The template already wrote any BOS it wants; don't let the tokenizer add another.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
