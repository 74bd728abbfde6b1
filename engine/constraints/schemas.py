"""What a JSON schema or a tool set must be before it is compiled: each rule checked here, once.

* :func:`check_schema`: a JSON object that is a valid JSON schema (its own metaschema, draft
  2020-12 unless ``$schema`` names another).
* :func:`check_tools`: a non-empty list of function definitions with unique, non-empty names and
  valid parameter schemas.
* :func:`check_representable`: no character constrained output cannot spell.
* :func:`enforceable_schema`: only keywords outlines enforces (a small integer range becomes an
  enum).

The compiler runs all four for its direct callers; the server calls :func:`check_schema` and
:func:`check_tools` while it validates a request (turning a ConstraintError into a 400 that names
the field), so a schema or tool set it accepted passes them again in the compiler. This module
imports no torch, numpy or outlines_core.
"""

from __future__ import annotations

import jsonschema

from ..tools import normalize_tools
from .errors import ConstraintError
from .vocabulary import UNREPRESENTABLE

__all__ = ["EMPTY_PARAMS", "check_schema", "check_tools", "check_representable", "enforceable_schema"]

EMPTY_PARAMS = {"type": "object", "properties": {}}  # the parameters of a tool that declares none


def check_schema(schema, what: str, *, tool_index: int | None = None) -> None:
    """ConstraintError unless ``schema`` is a JSON object that is a valid JSON schema; ``what``
    names it in the message (``tool_index``: the tool whose parameters it is)."""
    where_tool = {} if tool_index is None else {"tool_index": tool_index, "tool_field": "parameters"}
    if not isinstance(schema, dict):
        raise ConstraintError(f"{what} must be a JSON object, got {type(schema).__name__}", **where_tool)
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ConstraintError(f"{what} is not a valid JSON schema: {e.message} (at {where})", **where_tool) from None
    except Exception as e:  # e.g. unresolvable $schema
        raise ConstraintError(f"{what} is not a valid JSON schema: {e}", **where_tool) from None


def check_tools(tools) -> dict[str, dict]:
    """The tool-set rules: a non-empty list of function definitions, each in OpenAI's shape
    (``{"type": "function", "function": {...}}``) or flat (``{"name", "description",
    "parameters"}``), with a non-empty name no other tool has and parameters that are a valid JSON
    schema (None or ``{}``: no parameters).

    Returns ``{name: parameters schema}`` in definition order. A ConstraintError about one tool
    carries its index and field (``tool_index``, ``tool_field``: "name" or "parameters")."""
    try:
        flat = normalize_tools(tools)
    except ValueError as e:
        raise ConstraintError(str(e)) from None
    if not flat:
        raise ConstraintError("tools must be a non-empty list of function definitions")
    params: dict[str, dict] = {}
    for i, t in enumerate(flat):
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise ConstraintError(
                f"tools[{i}]: function name must be a non-empty string", tool_index=i, tool_field="name"
            )
        if name in params:
            raise ConstraintError(f"tools[{i}]: duplicate function name {name!r}", tool_index=i, tool_field="name")
        p = t.get("parameters")
        if p is None or p == {}:
            p = EMPTY_PARAMS
        check_schema(p, f"tools[{i}]: parameters of tool {name!r}", tool_index=i)
        params[name] = p
    return params


def check_representable(obj, what: str) -> None:
    """ConstraintError if a schema or tool definition holds a character in U+100000..U+10FFFF.

    Constrained output cannot spell those (END is one of them, and the tokens that could spell
    the others are left out of the vocabulary so that nothing but the sentinel spells END). A
    schema that requires one (a const, an enum value, a property name) would compile, then leave
    the model no allowed token but an EOS the constraint rejects, which fails the running batch;
    it is refused up front instead. The whole definition is checked, descriptions included: one
    rule for the client to read rather than a list of keywords that feed the regex.
    """
    todo = [(obj, "")]  # iterative: a deeply nested schema must not hit the recursion limit
    while todo:
        node, path = todo.pop()
        if isinstance(node, str):
            m = UNREPRESENTABLE.search(node)
            if m:
                raise ConstraintError(
                    f"{what} contains the character U+{ord(m.group()):06X} at {path or '/'}; constrained "
                    "decoding cannot produce characters in U+100000..U+10FFFF (supplementary private "
                    "use area B)"
                )
        elif isinstance(node, dict):
            for k, v in reversed(node.items()):
                todo.append((v, f"{path}/{k}"))
                todo.append((k, f"{path}/{k}"))
        elif isinstance(node, (list, tuple)):
            todo.extend((v, f"{path}/{i}") for i, v in reversed(list(enumerate(node))))


# Keywords outlines_core's regex builder accepts but does not enforce: the output could then break
# its own schema, so a schema that uses them is refused rather than silently loosened.
_UNENFORCED = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "contains",
    "minContains",
    "maxContains",
    "propertyNames",
    "patternProperties",
    "unevaluatedProperties",
    "unevaluatedItems",
)
_MAX_INT_ENUM = 1000


def enforceable_schema(schema, what: str = "JSON schema", path: str = ""):
    """A copy of schema that outlines enforces exactly, or ConstraintError naming what it cannot.

    A bounded integer range of at most 1000 values becomes an enum (which outlines enforces);
    other bounds and the keywords in _UNENFORCED are refused.
    """
    if isinstance(schema, list):
        return [enforceable_schema(s, what, f"{path}/{i}") for i, s in enumerate(schema)]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {k: enforceable_schema(v, what, f"{path}/{key}/{k}") for k, v in value.items()}
        elif key in ("enum", "const", "default", "examples", "required", "description", "title"):
            out[key] = value
        else:
            out[key] = enforceable_schema(value, what, f"{path}/{key}")
    lo, hi = out.get("minimum"), out.get("maximum")
    if isinstance(out.get("exclusiveMinimum"), int) and lo is None:
        lo = out["exclusiveMinimum"] + 1
    if isinstance(out.get("exclusiveMaximum"), int) and hi is None:
        hi = out["exclusiveMaximum"] - 1
    if (
        out.get("type") == "integer"
        and isinstance(lo, int)
        and isinstance(hi, int)
        and 0 <= hi - lo < _MAX_INT_ENUM
        and "multipleOf" not in out
    ):
        for key in ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            out.pop(key, None)
        out["enum"] = list(range(lo, hi + 1))
    for key in _UNENFORCED:
        if key in out:
            hint = (
                f" (an integer range with both bounds and at most {_MAX_INT_ENUM} values is supported)"
                if key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
                else ""
            )
            raise ConstraintError(
                f"{what} uses the unsupported keyword '{key}' at {path or '/'}: "
                f"constrained decoding cannot enforce it{hint}"
            )
    return out
