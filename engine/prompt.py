"""Chat template rendering: messages (plain dicts) -> prompt token ids."""

from __future__ import annotations

import json

from .tools import default_tool_prompt, detect_family, get_format, template_supports_tools


class PromptError(ValueError):
    """The messages cannot be rendered for this model (maps to HTTP 400)."""

    def __init__(self, message: str, param: str | None = "messages"):
        super().__init__(message)
        self.param = param


class PromptTooLong(PromptError):
    """The rendered prompt has more characters than context_length tokens can cover (HTTP 400,
    context_length_exceeded), found without tokenizing it."""


# Unicode composition (NFC / NFKC) turns at most 4 characters into one (a character's canonical
# decomposition is at most 4 long; Hangul L+V+T is 3), so a token can stand for 4x its own length.
_COMPOSE_FACTOR = 4
_NORMALIZERS = {
    "Prepend": 1,
    "Lowercase": 1,
    "ByteLevel": 1,
    "NFD": 1,
    "NFKD": 1,
    "NFC": _COMPOSE_FACTOR,
    "NFKC": _COMPOSE_FACTOR,
}
_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts", "Split"}


def _normalizer_factor(spec: dict | None) -> int | None:
    """How many input characters a normalized character can come from; None when unbounded or
    unknown (Strip, BertNormalizer, Precompiled and Nmt drop or collapse characters)."""
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1
        for sub in spec.get("normalizers") or []:
            f = _normalizer_factor(sub)
            if f is None:
                return None
            factor *= f
        return factor
    if kind == "Replace":
        pattern, content = (spec.get("pattern") or {}).get("String"), spec.get("content") or ""
        if not isinstance(pattern, str) or not content:  # a regex, or a deletion
            return None
        return -(-len(pattern) // len(content))
    return _NORMALIZERS.get(kind)


def _pre_tokenizer_keeps_text(spec: dict | None) -> bool:
    """False for pre-tokenizers that drop characters (Whitespace, Bert, a Split that removes)."""
    if spec is None:
        return True
    if spec.get("type") == "Sequence":
        return all(_pre_tokenizer_keeps_text(sub) for sub in spec.get("pretokenizers") or [])
    return spec.get("type") in _PRE_TOKENIZERS and spec.get("behavior") != "Removed"


def chars_per_token_bound(tokenizer) -> int | None:
    """At most how many characters of text one token can stand for, or None if this tokenizer
    cannot promise a bound.

    A prompt with more characters than context_length times this bound cannot fit, so it can be
    refused without tokenizing it (tokenizing megabytes takes seconds). A token's vocabulary
    string is at least as long as the text it covers: byte-level BPE spells each byte as one
    character ('Ġ' is the space byte, and a character is at least one byte), sentencepiece spells
    a space as '▁' and a byte as '<0x0A>'. What can make one token cover more is refused here:
    normalizers that delete or collapse characters, pre-tokenizers that drop whitespace, unknown
    tokens that swallow a run of characters (WordPiece, Unigram, BPE's fused unk), added
    tokens that strip the whitespace around them, and slow tokenizers we cannot inspect.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:  # the components' own JSON: the whole tokenizer's would serialise the vocabulary too
        norm, pre = backend.normalizer, backend.pre_tokenizer
        normalizer = json.loads(norm.__getstate__()) if norm is not None else None
        pre_tokenizer = json.loads(pre.__getstate__()) if pre is not None else None
    except Exception:
        return None
    factor = _normalizer_factor(normalizer)
    if factor is None or not _pre_tokenizer_keeps_text(pre_tokenizer):
        return None
    model = backend.model
    if type(model).__name__ != "BPE":  # WordPiece: a whole unknown word is one [UNK]; Unigram
        return None  # fuses unknown characters into one <unk>
    fused_unk = getattr(model, "fuse_unk", True) and not getattr(model, "byte_fallback", False)
    if model.unk_token is not None and fused_unk:
        return None
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    if any(getattr(t, "lstrip", False) or getattr(t, "rstrip", False) for t in added.values()):
        return None
    pieces = list(tokenizer.get_vocab()) + [t.content for t in added.values()]
    return factor * max((len(p) for p in pieces), default=1)


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
    def __init__(self, tokenizer, processor=None):
        self.tokenizer = tokenizer
        self.processor = processor  # vision-language models: its template places the image tokens
        self.template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
        self.family = detect_family(tokenizer)
        self.template_tools = template_supports_tools(tokenizer)
        self.max_chars_per_token = chars_per_token_bound(tokenizer)

    def max_prompt_chars(self, context_length: int) -> int | None:
        """The longest rendered prompt (in characters) that could still fit in fewer than
        context_length tokens; None when the tokenizer gives no bound."""
        if self.max_chars_per_token is None:
            return None
        return (context_length - 1) * self.max_chars_per_token

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
            content = m.get("content")
            if (
                self.processor is not None
                and isinstance(content, list)
                and any(p.get("type") == "image_url" for p in content)
            ):
                # the processor's template writes each image's placeholder where its part stands
                m["content"] = [
                    {"type": "image"} if p.get("type") == "image_url" else {"type": "text", "text": p.get("text", "")}
                    for p in content
                ]
            else:
                m["content"] = _text_of(content)
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

        ``tools`` are in OpenAI's shape (``{"type": "function", "function": {"name", "description",
        "parameters"}}``), the shape chat templates take. A template that renders tools gets them as
        they are; otherwise the tool definitions and the instructions (``tool_prompt`` overrides the
        default wording) go into the system message. A tool_prompt given with a tool-aware template
        is added to the system message.
        """
        if not tools:
            return messages, {}
        if self.template_tools:
            kwargs = {"tools": tools}
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

    def render_text(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        tool_prompt: str | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        if not self.has_template:
            raise PromptError(
                "this model has no chat template, so chat messages cannot be rendered; "
                "serve a chat/instruct model or one whose tokenizer defines chat_template"
            )
        messages, kwargs = self.with_tools(messages, tools, tool_prompt)
        owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        try:
            return owner.apply_chat_template(
                self.normalize(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except Exception as exc:  # jinja raise_exception() in templates, e.g. role alternation rules
            raise PromptError(f"the model's chat template rejected the messages: {exc}") from exc

    def render(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        tool_prompt: str | None = None,
        add_generation_prompt: bool = True,
        context_length: int | None = None,
    ) -> list[int]:
        """Prompt token ids. With context_length, a prompt too long to fit in it is refused
        (PromptTooLong) before tokenizing: rendering megabytes takes milliseconds, tokenizing
        them seconds. The rendered text is measured, not the messages, so the template's own text
        counts and text a template leaves out (e.g. earlier reasoning) does not."""
        text = self._checked_text(messages, tools, tool_prompt, add_generation_prompt, context_length)
        # The template already wrote any BOS it wants; don't let the tokenizer add another.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def render_multimodal(
        self,
        messages: list[dict],
        images: list,
        *,
        tools: list[dict] | None = None,
        tool_prompt: str | None = None,
        context_length: int | None = None,
    ) -> tuple[list[int], dict]:
        """Prompt token ids with each image's placeholder expanded by the processor, and the
        processor's image tensors (pixel values, sizes, grids: whatever the model's vision encoder
        takes). ``images`` are PIL images in the order their parts appear in the messages."""
        if self.processor is None:
            raise PromptError("this model does not accept images (it is a text-only model)")
        text = self._checked_text(messages, tools, tool_prompt, True, context_length)
        try:
            # the template wrote any BOS it wants (as for text prompts)
            enc = self.processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
        except Exception as exc:  # e.g. an image the image processor cannot resize
            raise PromptError(f"the model's processor could not prepare the images: {exc}") from exc
        ids = enc["input_ids"][0].tolist()
        encoder_inputs = {
            k: v
            for k, v in enc.items()
            if k not in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
        }
        return ids, encoder_inputs

    def _checked_text(self, messages, tools, tool_prompt, add_generation_prompt, context_length) -> str:
        text = self.render_text(
            messages, tools=tools, tool_prompt=tool_prompt, add_generation_prompt=add_generation_prompt
        )
        limit = self.max_prompt_chars(context_length) if context_length is not None else None
        if limit is not None and len(text) > limit:
            raise PromptTooLong(
                f"the prompt is {len(text)} characters, but this model's context length is {context_length} "
                f"tokens and none of its tokens covers more than {self.max_chars_per_token} characters, "
                f"so at most {limit} characters can fit"
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # e.g. a lone surrogate from a "\\ud800" JSON escape
            raise PromptError(f"message text is not valid Unicode: {exc.reason} at position {exc.start}") from None
        return text
