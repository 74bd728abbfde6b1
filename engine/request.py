"""Plain request / event types: the engine's public vocabulary.

The server builds these from the wire format; the engine never sees pydantic models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Temperatures below this sample as greedy: logits / T overflows float32 long before T reaches 0
# (1e-38 turns every finite logit into +-inf and the softmax into NaN), and a distribution that
# sharp is argmax anyway.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int | None = None  # None: whatever fits in the context
    temperature: float = 1.0  # below GREEDY_TEMPERATURE (0 included) -> greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0  # EOS is masked until this many tokens (benchmarks)
    ignore_eos: bool = False
    prompt_logprobs: int | None = None  # None: off; N: each prompt token's logprob (+ N alternatives)
    eos_logprob: bool = False  # logprobs list the EOS that ends the text too (/v1/completions)

    @property
    def greedy(self) -> bool:
        """Decided here, once, so a near-zero temperature never reaches the division in sampling
        and such a row needs no random generator."""
        return self.temperature < GREEDY_TEMPERATURE

    def replace(self, **kw) -> SamplingParams:
        return dataclasses.replace(self, **kw)


@dataclass
class ConstraintSpec:
    """What the output must match; compiled by engine.constraints.

    kind: "json_object" | "json_schema" | "tools"
    schema: the JSON schema (json_schema).
    tools: the tool definitions (tools), in OpenAI's shape {"type": "function", "function":
      {"name", "description", "parameters"}} as the server passes them (flat
      {"name", "description", "parameters"} dicts are accepted too).
    tool_choice: "auto" | "required" | a tool name (tools).
    parallel_tool_calls: allow more than one call (tools).
    """

    kind: str
    schema: dict | None = None
    tools: list[dict] | None = None
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True


@dataclass
class MultimodalInputs:
    """A prompt's images as the model's vision encoder takes them (Engine.prepare_prompt makes it;
    the server passes it on unopened)."""

    encoder_inputs: dict[str, Any]  # the processor's tensors: pixel_values, image sizes/grids
    digest: str  # hash of the images' bytes: prompts with other images share no KV
    num_images: int


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    constraint: Any = None  # a compiled constraint (engine.constraints), or None
    multimodal: MultimodalInputs | None = None


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class TokenEvent:
    """One step's output for one request.

    text: newly released text (UTF-8 complete, stop strings held back / removed).
    token_ids: ids sampled this step (usually one).
    logprobs: one entry per token whose text is released with this event.
    finish_reason: None while running; "stop" | "length" | "abort" | "error" at the end.
    """

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    error: str | None = None
    # with SamplingParams.prompt_logprobs, on a request's first event: one entry per prompt token
    # (None for the first, which nothing predicts)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    queue_time: float | None = None  # on the last event: seconds from arrival until the prefill began
