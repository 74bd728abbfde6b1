"""Every check on a chat completion (and a plain completion) request, in one place: wire request
-> engine request.

Nothing reaches the engine unchecked; every problem becomes an APIError (4xx, OpenAI's shape)
naming the offending field. A schema's validity and a tool set's names and parameter schemas are
checked by the engine's own rules (engine.constraints.schemas), called from here; the rest of what
a constraint must meet (keywords outlines can enforce, characters it can spell, the complexity
budget) the compiler checks when the app compiles it, and the app turns its ConstraintError into a
400 or 429.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from pydantic import ValidationError

from engine.constraints.errors import ConstraintError
from engine.constraints.schemas import check_schema, check_tools
from engine.prompt import PromptError, PromptTooLong
from engine.request import ConstraintSpec, SamplingParams

from .errors import bad_request
from .protocol import ChatCompletionRequest, CompletionRequest

ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_STOP = 4
MAX_TOP_LOGPROBS = 5
MAX_N = 128  # choices per prompt (OpenAI's limit)
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's max_tokens default for /v1/completions
TOKEN_ID = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() also takes "²" and "٣"


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


def _loc(err: dict) -> str:
    parts = []
    for p in err.get("loc", ()):
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif (
            p in ("str", "list[str]", "int", "float", "bool")
            or "[" in str(p)
            or p.startswith(("function-", "tagged-union"))
        ):
            continue  # pydantic's union-branch labels, not field names
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or None


# fields whose type is a union: one message naming every shape they take, not one branch's complaint
_SHAPES = {"prompt": "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"}


def parse_body(raw: bytes, model: type[ChatCompletionRequest | CompletionRequest] = ChatCompletionRequest):
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        # the deepest error is the most specific one (e.g. a bad content part, not "expected a string")
        err = max(exc.errors(), key=lambda e: len(e.get("loc", ())))
        param = _loc(err)
        if err["type"] == "missing":
            msg = f"missing required field: {param}"
        elif param is not None and param.split("[")[0] in _SHAPES:
            param = param.split("[")[0]
            msg = _SHAPES[param]
        elif err["type"] == "union_tag_invalid" or err["type"] == "union_tag_not_found":
            msg = f"{param}: unknown content part type (expected 'text' or 'image_url')"
        else:
            msg = f"{param}: {err['msg']}"
        raise bad_request(
            msg, param=param, code="invalid_type" if err["type"] != "missing" else "missing_field"
        ) from None


def _range(name: str, value, lo, hi, *, lo_open=False) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise bad_request(f"{name} must be a finite number", param=name, code="invalid_value")
    if value < lo or value > hi or (lo_open and value == lo):
        lo_txt = f"greater than {lo}" if lo_open else f"at least {lo}"
        raise bad_request(f"{name} must be {lo_txt} and at most {hi}; got {value}", param=name, code="invalid_value")


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


def _token_id(key: str) -> int | None:
    """A logit_bias key as a token id: ASCII decimal digits only (no sign, no spaces), else None.

    The one parser for these keys: int() also accepts " 5", "+5" and "٣" and rejects "²", which
    str.isdigit() accepts. A number of more than 18 digits is no token id (and int() raises past
    4300 digits), so it is refused before int() sees it."""
    if not TOKEN_ID.fullmatch(key):
        return None
    digits = key.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else None


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


def _sampling(
    req: ChatCompletionRequest | CompletionRequest,
    *,
    vocab_size: int,
    max_tokens: int | None,
    logprobs: bool,
    top_logprobs: int,
) -> SamplingParams:
    """The fields chat and plain completions share, checked (OpenAI's ranges), as engine parameters."""
    _range("temperature", req.temperature, 0.0, 2.0)
    _range("top_p", req.top_p, 0.0, 1.0, lo_open=True)
    _range("frequency_penalty", req.frequency_penalty, -2.0, 2.0)
    _range("presence_penalty", req.presence_penalty, -2.0, 2.0)
    if req.min_tokens is not None and req.min_tokens < 0:
        raise bad_request("min_tokens must be at least 0", param="min_tokens", code="invalid_value")
    if req.seed is not None and not (-(2**63) <= req.seed < 2**64):
        raise bad_request("seed must fit in 64 bits", param="seed", code="invalid_value")

    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise bad_request(
            f"stop may hold at most {MAX_STOP} sequences; got {len(stop)}", param="stop", code="invalid_value"
        )
    if any(s == "" for s in stop):
        raise bad_request("stop sequences must be non-empty strings", param="stop", code="invalid_value")

    if req.stream_options is not None and not req.stream:
        raise bad_request(
            "stream_options is only allowed when stream is true", param="stream_options", code="invalid_value"
        )

    logit_bias = {}
    for key, value in (req.logit_bias or {}).items():
        token_id = _token_id(key)
        if token_id is None or not token_id < vocab_size:
            raise bad_request(
                f"logit_bias keys must be token ids between 0 and {vocab_size - 1}; got {key!r}",
                param="logit_bias",
                code="invalid_value",
            )
        _range(f"logit_bias[{key}]", value, -100.0, 100.0)
        logit_bias[token_id] = float(value)

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=None if req.seed is None else req.seed % (2**63),
        stop=stop,
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        logit_bias=logit_bias,
        min_tokens=req.min_tokens or 0,
        ignore_eos=bool(req.ignore_eos),
    )


# ---------------------------------------------------------------------------------- /v1/completions
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


TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _check_schema(schema, param: str) -> None:
    """The engine's rule (engine.constraints.schemas.check_schema), as a 400 naming ``param``."""
    try:
        check_schema(schema, param)
    except ConstraintError as exc:
        raise bad_request(str(exc), param=param, code="invalid_schema") from None


def _response_format(rf: dict | None) -> ConstraintSpec | None:
    """OpenAI's shapes, plus TGI's {"type": "json"|"json_object"|"json_schema", "value": ...}."""
    if rf is None:
        return None
    kind = rf.get("type")
    if kind == "text":
        return None
    if "value" in rf and kind in ("json", "json_object", "json_schema"):  # TGI
        value = rf["value"]
        if isinstance(value, dict) and isinstance(value.get("schema"), dict) and "name" in value:
            value = value["schema"]
        if value is None or value == {}:
            return ConstraintSpec(kind="json_object")
        _check_schema(value, "response_format.value")
        return ConstraintSpec(kind="json_schema", schema=value)
    if kind == "json_object":
        return ConstraintSpec(kind="json_object")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise bad_request(
                "response_format.json_schema is required for type json_schema",
                param="response_format.json_schema",
                code="missing_field",
            )
        if not isinstance(js.get("name"), str) or not js["name"]:
            raise bad_request(
                "response_format.json_schema.name is required",
                param="response_format.json_schema.name",
                code="missing_field",
            )
        schema = js.get("schema")
        # {} allows any JSON value, and a JSON object is one (TGI's shape above does the same):
        # compiling {} itself runs outlines past the compile timeout, a 400 for a valid request
        if schema is None or schema == {}:
            return ConstraintSpec(kind="json_object")
        _check_schema(schema, "response_format.json_schema.schema")
        return ConstraintSpec(kind="json_schema", schema=schema)
    raise bad_request(
        f"response_format.type must be one of text, json_object, json_schema; got {kind!r}",
        param="response_format.type",
        code="invalid_value",
    )


def _structured_output(req: ChatCompletionRequest) -> tuple[ConstraintSpec | None, list[dict] | None]:
    rf = _response_format(req.response_format)
    if not req.tools:
        if req.tool_choice is not None:
            raise bad_request(
                "tool_choice is only allowed when tools are given", param="tool_choice", code="invalid_value"
            )
        if req.tools is not None:
            raise bad_request("tools must not be empty", param="tools", code="invalid_value")
        return rf, None
    tools = []
    for i, tool in enumerate(req.tools):
        fn = tool.function
        if tool.type != "function":
            raise bad_request(f"tools[{i}].type must be 'function'", param=f"tools[{i}].type", code="invalid_value")
        if not TOOL_NAME.match(fn.name):
            raise bad_request(
                f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'; got {fn.name!r}",
                param=f"tools[{i}].function.name",
                code="invalid_value",
            )
        params = fn.parameters if fn.parameters is not None else {"type": "object", "properties": {}}
        # OpenAI's shape, which the engine takes as it is (chat templates render it; the compiler reads it)
        tools.append(
            {
                "type": "function",
                "function": {"name": fn.name, "description": fn.description or "", "parameters": params},
            }
        )
    try:
        names = set(check_tools(tools))  # unique names, valid parameter schemas: the engine's rules
    except ConstraintError as exc:
        param = f"tools[{exc.tool_index}].function.{exc.tool_field}" if exc.tool_index is not None else "tools"
        raise bad_request(
            str(exc), param=param, code="invalid_schema" if exc.tool_field == "parameters" else "invalid_value"
        ) from None
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise bad_request(
                f"tool_choice must be 'auto', 'none', 'required' or a function; got {choice!r}",
                param="tool_choice",
                code="invalid_value",
            )
    else:
        if choice.function.name not in names:
            raise bad_request(
                f"tool_choice names {choice.function.name!r}, which is not among the tools",
                param="tool_choice.function.name",
                code="invalid_value",
            )
        choice = choice.function.name
    if choice == "none":
        return rf, None  # no calls: the tools are not shown to the model either
    if rf is not None:
        raise bad_request(
            "response_format cannot be combined with tools unless tool_choice is 'none'",
            param="response_format",
            code="invalid_value",
        )
    parallel = True if req.parallel_tool_calls is None else req.parallel_tool_calls
    return ConstraintSpec(kind="tools", tools=tools, tool_choice=choice, parallel_tool_calls=parallel), tools


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
