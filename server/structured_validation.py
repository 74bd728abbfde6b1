"""response_format and tools (with tool_choice) of a chat request -> the engine's ConstraintSpec.

A schema's validity and a tool set's names and parameter schemas are checked by the engine's own
rules (engine.constraints.schemas), called from here; the rest of what a constraint must meet
(keywords outlines can enforce, characters it can spell, the complexity budget) the compiler checks
when the app compiles it, and the app turns its ConstraintError into a 400 or 429.
"""

from __future__ import annotations

import re

from engine.constraints.errors import ConstraintError
from engine.constraints.schemas import check_schema, check_tools
from engine.request import ConstraintSpec

from .errors import bad_request
from .protocol import ChatCompletionRequest

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
