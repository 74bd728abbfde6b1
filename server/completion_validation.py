"""Every check on a plain completion request (POST /v1/completions): wire request -> engine request.

The sampling fields it shares with chat are checked in server/sampling_validation.py; body parsing
is server/request_body.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.prompt import PromptError, PromptTooLong
from engine.request import SamplingParams

from .errors import bad_request
from .protocol import CompletionRequest
from .sampling_validation import MAX_TOP_LOGPROBS, _range, _sampling

MAX_N = 128  # choices per prompt (OpenAI's limit)
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's max_tokens default for /v1/completions


@dataclass
class CompletionPrompt:
    """One prompt of a completion request, as the engine takes it and as the reply echoes it."""

    ids: list[int]
    text: str | None = None  # the prompt as text (echo): as sent, or its token ids decoded
    offsets: list[int] | None = None  # each token's character offset in text (a text prompt)
    source: str | list[int] = ""  # as sent


@dataclass
class ValidatedCompletion:
    wire: CompletionRequest
    prompts: list[CompletionPrompt]
    params: SamplingParams  # each choice's; choice i of a seeded request gets seed + i
    n: int
    echo: bool
    logprobs: int | None  # None: no logprobs; N: N alternatives per token
    stream: bool
    include_usage: bool


def validate_completion(
    req: CompletionRequest, *, vocab_size: int, scores_prompts: bool = True, max_choices: int | None = None
) -> ValidatedCompletion:
    """The plain-completion fields, then the sampling fields chat shares. ``scores_prompts``: the
    engine can return prompt logprobs and score without generating; ``max_choices``: the most
    prompts x n the engine can ever hold at once (more could never be admitted)."""
    if req.suffix:
        raise bad_request(
            "suffix is not supported (no insertion: send the text before the gap as the prompt)",
            param="suffix",
            code="unsupported_value",
        )
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        sources = [prompt]  # one text, or one list of token ids
    else:
        sources = list(prompt)
    if not sources:
        raise bad_request("prompt must not be an empty list", param="prompt", code="invalid_value")
    for i, source in enumerate(sources):
        if isinstance(source, list):
            where = "prompt" if len(sources) == 1 and source is prompt else f"prompt[{i}]"
            if not source:
                raise bad_request(
                    f"{where} must not be an empty list of token ids", param="prompt", code="invalid_value"
                )
            bad = next((t for t in source if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise bad_request(
                    f"{where} holds token id {bad}; token ids are between 0 and {vocab_size - 1}",
                    param="prompt",
                    code="invalid_value",
                )

    n = 1 if req.n is None else req.n
    _range("n", req.n, 1, MAX_N)
    if req.best_of is not None and req.best_of != n:
        raise bad_request(
            f"best_of must equal n ({n}): the server returns every sample it draws; got {req.best_of}",
            param="best_of",
            code="unsupported_value",
        )
    if max_choices is not None and len(sources) * n > max_choices:
        raise bad_request(
            f"{len(sources)} prompts x n={n} is {len(sources) * n} sequences; this server runs and "
            f"queues at most {max_choices} at once",
            param="n" if n > 1 else "prompt",
            code="invalid_value",
        )
    _range("logprobs", req.logprobs, 0, MAX_TOP_LOGPROBS)
    echo = bool(req.echo)
    max_tokens = DEFAULT_COMPLETION_TOKENS if req.max_tokens is None else req.max_tokens
    if max_tokens < 0 or (max_tokens == 0 and not echo):
        raise bad_request(
            f"max_tokens must be at least 1 (0 only with echo, to score the prompt); got {max_tokens}",
            param="max_tokens",
            code="invalid_value",
        )
    scoring = echo and req.logprobs is not None
    if (scoring or max_tokens == 0) and not scores_prompts:
        raise bad_request(
            "this server's engine runs the fallback path (--no-packed, or a model the paged step "
            "does not fit), which cannot return prompt logprobs or score without generating: "
            "echo with logprobs and max_tokens 0 are unavailable",
            param="echo",
            code="unsupported_value",
        )

    params = _sampling(
        req,
        vocab_size=vocab_size,
        max_tokens=max_tokens,
        logprobs=req.logprobs is not None,
        top_logprobs=req.logprobs or 0,
    )
    # OpenAI's legacy logprobs list every generated token, the EOS that ends the text too (harnesses
    # score with echo and max_tokens 1 and drop the last entry as the generated one)
    params.eos_logprob = req.logprobs is not None
    if scoring:
        params.prompt_logprobs = req.logprobs
    prompts = [CompletionPrompt(ids=list(s) if isinstance(s, list) else [], source=s) for s in sources]
    include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
    return ValidatedCompletion(
        wire=req,
        prompts=prompts,
        params=params,
        n=n,
        echo=echo,
        logprobs=req.logprobs,
        stream=bool(req.stream),
        include_usage=include_usage,
    )


def tokenize_and_fit(v: ValidatedCompletion, engine) -> None:
    """Tokenize text prompts (no chat template), decode token-id prompts that are echoed, and check
    each prompt (plus max_tokens) fits in the context window. Blocking: call it off the event loop."""
    ctx = engine.max_model_len
    many = len(v.prompts) > 1
    for i, p in enumerate(v.prompts):
        where = f"prompt[{i}]" if many else "prompt"
        if isinstance(p.source, str):
            try:
                p.ids, p.offsets = engine.encode_text(p.source, context_length=ctx)
            except PromptTooLong as exc:
                raise bad_request(f"{where}: {exc}", param="prompt", code="context_length_exceeded") from None
            except PromptError as exc:
                raise bad_request(f"{where}: {exc}", param="prompt", code="invalid_prompt") from None
            p.text = p.source
            if not p.ids:
                raise bad_request(f"{where} is empty: it has no tokens", param="prompt", code="invalid_value")
        elif v.echo:
            p.text = engine.decode_prompt(p.ids)
        n, mt = len(p.ids), v.params.max_tokens
        if n + mt > ctx:
            more = (
                f" and max_tokens is {mt} ({n + mt} in all). Lower max_tokens to at most {ctx - n}"
                if mt and n < ctx
                else ""
            )
            raise bad_request(
                f"this model's context length is {ctx} tokens; {where} is {n} tokens{more}.",
                param="max_tokens" if more else "prompt",
                code="context_length_exceeded",
            )
