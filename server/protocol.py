"""Pydantic models of the Chat Completion wire format (requests, responses, chunks, errors).

Requests are strict about types (a string where a number belongs is a 400, as with OpenAI) and
ignore unknown fields. Range checks and cross-field rules live in server/validation.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Req(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# ---------------------------------------------------------------- request
class ImageURL(_Req):
    url: str
    detail: str | None = None


class TextPart(_Req):
    type: Literal["text"]
    text: str


class ImagePart(_Req):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Req):
    name: str
    arguments: str | dict[str, Any] = "{}"
    description: str | None = None
    parameters: Any = None


class ToolCall(_Req):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class Message(_Req):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Req):
    name: str
    description: str | None = None
    parameters: Any = None
    strict: bool | None = None


class Tool(_Req):
    type: str = "function"
    function: FunctionDef


class ToolChoiceFunction(_Req):
    name: str


class ToolChoiceObject(_Req):
    type: str = "function"
    function: ToolChoiceFunction


class StreamOptions(_Req):
    include_usage: bool | None = None


class ChatCompletionRequest(_Req):
    model: str | None = None
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | ToolChoiceObject | None = None
    tool_prompt: str | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None
    # extensions (vLLM names): used by benchmarks to fix the output length
    ignore_eos: bool | None = None
    min_tokens: int | None = None


# ---------------------------------------------------------------- response
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = None


class FunctionOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (as OpenAI reports it)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "chatserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelHealth(BaseModel):
    """One served model's engine: its loop runs ("ok") or not, its load and counters."""

    status: Literal["ok", "unavailable"]
    running: int
    waiting: int
    stats: dict[str, int | float]


class Health(BaseModel):
    """GET /health: "ok" when every model's engine runs (else a 503, "unavailable"); running and
    waiting summed over the models, each model's own under `models` (by id). With one model,
    `model` names it and `stats` are its engine's counters."""

    status: Literal["ok", "unavailable"]
    model: str | None = None
    running: int | None = None
    waiting: int | None = None
    stats: dict[str, int | float] | None = None
    models: dict[str, ModelHealth] | None = None


# ---------------------------------------------------------------- /v1/completions (OpenAI's legacy shape)
class CompletionRequest(_Req):
    """A plain-text completion: no chat template. ``prompt`` is a string, a list of strings, a list
    of token ids, or a list of token-id lists; each prompt gets ``n`` choices of its own."""

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None  # refused (insertion is not supported)
    max_tokens: int | None = None  # OpenAI's default: 16; 0 (with echo) scores the prompt only
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    best_of: int | None = None  # only n (no server-side choosing among samples)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: int | None = None  # 0..5: each token's logprob and its top alternatives
    echo: bool | None = None  # the prompt before the completion (its logprobs too)
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    # extensions (vLLM names)
    ignore_eos: bool | None = None
    min_tokens: int | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: one entry per token in each list. With echo the prompt's tokens come
    first, and the first prompt token (nothing predicts it) has a null logprob and null alternatives."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]  # the top `logprobs` alternatives, and the token itself
    text_offset: list[int]  # each token's character offset in the choice's text


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
