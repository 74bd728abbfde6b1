"""Every check on a chat completion request: wire request -> engine request.

Nothing reaches the engine unchecked; every problem becomes an APIError (4xx, OpenAI's shape)
naming the offending field. A schema's validity and a tool set's names and parameter schemas are
checked by the engine's own rules (engine.constraints.schemas, called from structured_validation);
the rest of what a constraint must meet (keywords outlines can enforce, characters it can spell,
the complexity budget) the compiler checks when the app compiles it, and the app turns its
ConstraintError into a 400 or 429.

The checks are split by job, and every name stays importable from here:

* server/request_body.py -- the body as JSON -> the wire model (``parse_body``);
* server/sampling_validation.py -- the sampling fields chat and plain completions share;
* server/structured_validation.py -- response_format and tools -> the engine's ConstraintSpec;
* server/completion_validation.py -- plain completions (``validate_completion``, ``tokenize_and_fit``);
* this module -- chat's messages and limits (``validate``) and its prompt (``render_and_fit``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.prompt import PromptError, PromptTooLong
from engine.request import ConstraintSpec, SamplingParams

from .completion_validation import (
    DEFAULT_COMPLETION_TOKENS,
    MAX_N,
    CompletionPrompt,
    ValidatedCompletion,
    tokenize_and_fit,
    validate_completion,
)
from .errors import bad_request
from .protocol import ChatCompletionRequest

# F401: the split modules' helpers stay importable from here, as before the split
from .request_body import _SHAPES, _loc, parse_body  # noqa: F401
from .sampling_validation import MAX_STOP, MAX_TOP_LOGPROBS, TOKEN_ID, _range, _sampling, _token_id  # noqa: F401
from .structured_validation import TOOL_NAME, _check_schema, _response_format, _structured_output  # noqa: F401

__all__ = [
    "DEFAULT_COMPLETION_TOKENS",
    "MAX_N",
    "MAX_STOP",
    "MAX_TOP_LOGPROBS",
    "ROLES",
    "TOKEN_ID",
    "TOOL_NAME",
    "CompletionPrompt",
    "ValidatedCompletion",
    "ValidatedRequest",
    "parse_body",
    "render_and_fit",
    "tokenize_and_fit",
    "validate",
    "validate_completion",
]

ROLES = {"system", "developer", "user", "assistant", "tool"}


@dataclass
class ValidatedRequest:
    wire: ChatCompletionRequest
    messages: list[dict]
    params: SamplingParams
    stream: bool
    include_usage: bool
    prompt_ids: list[int] = field(default_factory=list)
    constraint: ConstraintSpec | None = None
    tools: list[dict] | None = None  # OpenAI's shape: {"type": "function", "function": {...}}
    images: list = field(default_factory=list)  # decoded images (server/media.py), in message order
    multimodal: object = None  # the engine's MultimodalInputs for them (opaque here)


def _check_messages(req: ChatCompletionRequest, accepts_images: bool, max_images: int) -> list[dict]:
    if not req.messages:
        raise bad_request("messages must be a non-empty list", param="messages", code="invalid_value")
    out = []
    images = 0
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise bad_request(
                f"messages[{i}].role must be one of {sorted(ROLES)}; got {m.role!r}",
                param=f"messages[{i}].role",
                code="invalid_value",
            )
        if isinstance(m.content, list):
            if not m.content:  # OpenAI refuses an empty array too; a list of empty text parts is fine
                raise bad_request(
                    f"messages[{i}].content must not be an empty list",
                    param=f"messages[{i}].content",
                    code="invalid_value",
                )
            for j, part in enumerate(m.content):
                if part.type != "image_url":
                    continue
                if not accepts_images:
                    raise bad_request(
                        "this model does not accept images (it is a text-only model)",
                        param=f"messages[{i}].content[{j}]",
                        code="image_input_not_supported",
                    )
                if m.role != "user":
                    raise bad_request(
                        f"messages[{i}]: images may only be sent in user messages, not {m.role!r}",
                        param=f"messages[{i}].content[{j}]",
                        code="invalid_value",
                    )
                images += 1
                if images > max_images:
                    raise bad_request(
                        f"a request may hold at most {max_images} images",
                        param=f"messages[{i}].content[{j}]",
                        code="too_many_images",
                    )
        if m.role == "tool" and m.tool_call_id is None:
            raise bad_request(
                f"messages[{i}]: a tool message needs tool_call_id",
                param=f"messages[{i}].tool_call_id",
                code="missing_field",
            )
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise bad_request(
                f"messages[{i}].content is required", param=f"messages[{i}].content", code="missing_field"
            )
        d = m.model_dump(exclude_none=True)
        if m.role == "developer":  # OpenAI's newer name for system; templates know "system"
            d["role"] = "system"
        out.append(d)
    return out


def validate(
    req: ChatCompletionRequest, *, vocab_size: int, accepts_images: bool = False, max_images: int = 8
) -> ValidatedRequest:
    messages = _check_messages(req, accepts_images, max_images)

    if req.n is not None and req.n != 1:
        raise bad_request("only n=1 is supported", param="n", code="invalid_value")
    _range("top_logprobs", req.top_logprobs, 0, MAX_TOP_LOGPROBS)
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs", code="invalid_value")
    if (
        req.max_tokens is not None
        and req.max_completion_tokens is not None
        and req.max_tokens != req.max_completion_tokens
    ):
        raise bad_request(
            "max_tokens and max_completion_tokens disagree; send one", param="max_tokens", code="invalid_value"
        )
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"{name} must be at least 1; got {max_tokens}", param=name, code="invalid_value")
    params = _sampling(
        req,
        vocab_size=vocab_size,
        max_tokens=max_tokens,
        logprobs=bool(req.logprobs),
        top_logprobs=req.top_logprobs or 0,
    )
    constraint, tools = _structured_output(req)
    return ValidatedRequest(
        wire=req,
        messages=messages,
        params=params,
        stream=bool(req.stream),
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
        constraint=constraint,
        tools=tools,
    )


def render_and_fit(v: ValidatedRequest, engine) -> None:
    """Render the prompt and check it (plus max_tokens) fits in the context window.

    Blocking (tokenizing a long prompt takes a while): call it off the event loop. The renderer
    refuses, before tokenizing, a prompt with more characters than the context can hold.
    """
    ctx = engine.max_model_len
    try:
        v.prompt_ids, v.multimodal = engine.prepare_prompt(
            v.messages, v.images, tools=v.tools, tool_prompt=v.wire.tool_prompt, context_length=ctx
        )
    except PromptTooLong as exc:
        raise bad_request(str(exc), param=exc.param, code="context_length_exceeded") from None
    except PromptError as exc:
        raise bad_request(str(exc), param=exc.param, code="invalid_prompt") from None
    n = len(v.prompt_ids)
    mt = v.params.max_tokens
    if n >= ctx:
        raise bad_request(
            f"the prompt is {n} tokens, but this model's context length is {ctx} tokens",
            param="messages",
            code="context_length_exceeded",
        )
    if mt is not None and n + mt > ctx:
        name = "max_completion_tokens" if v.wire.max_completion_tokens is not None else "max_tokens"
        raise bad_request(
            f"this model's context length is {ctx} tokens; the prompt is {n} tokens and "
            f"{name} is {mt} ({n + mt} in all). Lower {name} to at most {ctx - n}.",
            param=name,
            code="context_length_exceeded",
        )
