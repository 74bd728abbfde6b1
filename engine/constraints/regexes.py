"""The regexes chatserve writes itself; outlines_core writes the ones of JSON schemas (in a compile
worker, see :mod:`engine.constraints.compile_worker`).

* :func:`build_json_object_regex`: response_format json_object.
* :func:`tool_calls_regex`: a family's call syntax around each tool's arguments regex.

They use the Rust ``regex`` syntax outlines_core reads. No torch or numpy here.
"""

from __future__ import annotations

import json

__all__ = ["DEFAULT_WHITESPACE", "build_json_object_regex", "tool_calls_regex"]

DEFAULT_WHITESPACE = r"[ ]?"  # at most one space between JSON tokens (no whitespace loops)

_RE_META = set("\\.+*?()|[]{}^$#&-~")


def _re_escape(text: str) -> str:
    """Escape for the Rust ``regex`` syntax outlines_core uses (meta characters only)."""
    return "".join("\\" + ch if ch in _RE_META else ch for ch in text)


def build_json_object_regex(ws: str = DEFAULT_WHITESPACE) -> str:
    """Regex for response_format json_object: a JSON object whose nesting is bounded.

    outlines_core's generic ``{"type": "object"}`` regex (three container levels, arrays
    and objects everywhere) becomes ~1600 automaton states -- ~16 s of Index building on a
    49k vocabulary, ~3x that on 150k vocabularies -- because the automaton is not
    minimised and every ``X(,X)*`` list doubles what is below it. This shape covers the
    usual replies at ~1000 states (~3 s on 49k):
      top-level object; a value is a scalar, an object of (scalars | arrays of scalars),
      or an array of (scalars | flat objects of scalars).
    """
    from outlines_core.json_schema import NUMBER, STRING

    w = ws
    scal = f"({STRING}|{NUMBER}|true|false|null)"

    def obj(v):
        kv = STRING + w + ":" + w + v + w
        return r"\{" + w + "(" + kv + "(," + w + kv + ")*)?" + r"\}"

    def arr(v):
        return r"\[" + w + "(" + v + w + "(," + w + v + w + ")*)?" + r"\]"

    def alt(*xs):
        return "(" + "|".join(xs) + ")"

    return obj(alt(scal, obj(alt(scal, arr(scal))), arr(alt(scal, obj(scal)))))


def tool_calls_regex(fmt, names: list[str], args_regexes: list[str], ws: str, parallel: bool) -> str:
    """The calls a reply may hold in the format ``fmt`` (an :class:`engine.tools.ToolFormat`): each
    a JSON object naming one of ``names`` with arguments matching that tool's regex; one call, or
    with ``parallel`` one or more."""
    bodies = []
    for n, args_rx in zip(names, args_regexes):
        bodies.append(
            r"\{"
            + ws
            + r'"name"'
            + ws
            + ":"
            + ws
            + _re_escape(json.dumps(n, ensure_ascii=False))
            + ws
            + ","
            + ws
            + _re_escape(json.dumps(fmt.args_key))
            + ws
            + ":"
            + ws
            + "("
            + args_rx
            + ")"
            + ws
            + r"\}"
        )
    call = "(" + "|".join(bodies) + ")"
    if parallel:  # X+ keeps one copy of the call automaton (X(sep X)* has two)
        return fmt.first_prefix_re + "(" + fmt.prefix_re + call + fmt.suffix_re + fmt.repeat_sep_re + ")+"
    return fmt.first_prefix_re + fmt.prefix_re + call + fmt.suffix_re + fmt.trailing_re
