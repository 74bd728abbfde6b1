"""The engine's text side of its public API: chat templates and plain-text prompts to token ids
(engine/prompt.py), token texts, and compiled constraints (engine/constraints/)."""

from __future__ import annotations

import hashlib
import logging

from .prompt import PromptError
from .request import MultimodalInputs

log = logging.getLogger("chatserve.engine")


class PromptAPI:
    """Part of Engine (engine.py): prompts and constraints, called by the server off the event loop."""

    def render_prompt(self, messages: list[dict], **kwargs) -> list[int]:
        return self.prompts.render(messages, **kwargs)

    # plain-text prompts (/v1/completions): no chat template
    def encode_text(self, text: str, context_length: int | None = None) -> tuple[list[int], list[int] | None]:
        """A plain-text prompt as token ids, with the special tokens the tokenizer adds (a BOS, for
        some models), and each token's character offset in ``text`` (None from a tokenizer that
        gives no offsets). With context_length, text too long to fit is refused (PromptTooLong)
        before tokenizing. Blocking: call it off the event loop."""
        from .prompt import PromptTooLong

        limit = self.prompts.max_prompt_chars(context_length) if context_length is not None else None
        if limit is not None and len(text) > limit:
            raise PromptTooLong(
                f"the prompt is {len(text)} characters, but this model's context length is "
                f"{context_length} tokens and none of its tokens covers more than "
                f"{self.prompts.max_chars_per_token} characters, so at most {limit} can fit",
                param="prompt",
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # e.g. a lone surrogate from a "\\ud800" JSON escape
            raise PromptError(
                f"prompt is not valid Unicode: {exc.reason} at position {exc.start}", param="prompt"
            ) from None
        if not getattr(self.tokenizer, "is_fast", False):
            return self.tokenizer(text)["input_ids"], None
        enc = self.tokenizer(text, return_offsets_mapping=True)
        # The tokens cover the text in order: a token starts where the one before it ended, or
        # earlier when both hold bytes of one character. Byte-level tokenizers trim a token's
        # leading space off its span, and tokens the tokenizer adds (a BOS) have empty spans.
        offsets, end = [], 0
        for start, stop in enc["offset_mapping"]:
            offsets.append(min(start, end) if stop > start else end)
            end = max(end, stop)
        return enc["input_ids"], offsets

    def decode_prompt(self, ids: list[int]) -> str:
        """Token ids as text, special tokens included (a token-id prompt, echoed)."""
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_texts(self, ids: list[int]) -> list[tuple[str, list[int]]]:
        """Each token's text and raw bytes, as logprobs show them."""
        return [self.texts.get(t) for t in ids]

    def prepare_prompt(
        self, messages: list[dict], images: list | None = None, **kwargs
    ) -> tuple[list[int], MultimodalInputs | None]:
        """Prompt token ids, and for a prompt with images what the vision encoder needs.

        ``images``: PIL images in the order their parts appear. Blocking (the processor resizes
        and normalizes the images): call it off the event loop.
        """
        if not images:
            return self.render_prompt(messages, **kwargs), None
        if not self.accepts_images:
            raise PromptError("this model does not accept images (it is a text-only model)")
        ids, encoder_inputs = self.prompts.render_multimodal(messages, images, **kwargs)
        h = hashlib.sha256()
        for im in images:
            h.update(f"{im.mode}{im.size}".encode())
            h.update(im.tobytes())
        return ids, MultimodalInputs(encoder_inputs, h.hexdigest(), len(images))

    @property
    def tool_family(self) -> str:
        """How this model writes tool calls (engine.tools.FAMILIES)."""
        return self.prompts.family

    def compile_constraint(self, spec, timeout: float = 10.0):
        """ConstraintSpec -> a compiled constraint (cached); raises constraints.ConstraintError.

        Blocking (compiling a new schema can take seconds): call it off the event loop.
        """
        return self.constraints.compile(spec, timeout=timeout)

    @property
    def constraints(self):
        """The outlines constraint compiler (built on first use: the vocabulary takes a moment)."""
        if self._constraints is None:
            from .constraints import ConstraintCompiler

            self._constraints = ConstraintCompiler(
                self.tokenizer, vocab_size=self.vocab_size, eos_token_ids=self.eos_ids
            )
        return self._constraints
