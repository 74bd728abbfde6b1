"""Constraint compile limits: the complexity budget checked before compiling, and compiles that
really stop (engine.constraints.compile_worker).

A schema over the budget is refused in milliseconds with a message naming the limit; a compile
that passes its timeout has its worker process killed: afterwards that process is gone, nothing
still compiles (no thread, no busy process), the server's RSS has not grown, and the next compile
works on a fresh worker. The timeout case is checked through the engine API and over HTTP.

Schemas, on the tiny 400-token tokenizer (timings measured on a loaded 2-core machine):
  optional_props(300): 300 properties, none required -> a 3.3 M character regex (refused in ms)
  long_strings(2000): three strings of maxLength 2000 -> 54k automaton states, ~4.5 M
    transitions: within the default budget for a 400-token vocabulary, ~4-5 s to compile
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import httpx
import jsonschema
import psutil
import pytest
from conftest import make_engine, serve_engine
from tiny_models import build_tokenizer

from engine.constraints import ConstraintBusy, ConstraintCompiler, ConstraintLimits, ConstraintTooComplex
from engine.constraints.compile_worker import CompilePool
from engine.request import ConstraintSpec
from server.cli import _configure_constraints, _serve_parser, resolve_serve_args

SMALL = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
    "required": ["name", "n"],
    "additionalProperties": False,
}
OTHER = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["a", "b"]}},
    "required": ["ok", "tag"],
    "additionalProperties": False,
}


def optional_props(n: int) -> dict:
    return {"type": "object", "properties": {f"prop_{i}": {"type": "string"} for i in range(n)}}


def long_strings(n: int) -> dict:
    return {
        "type": "object",
        "properties": {f"k{i}": {"type": "string", "maxLength": n} for i in range(3)},
        "required": ["k0", "k1", "k2"],
    }


def spec(schema) -> ConstraintSpec:
    return ConstraintSpec(kind="json_schema", schema=schema)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def pool():
    p = CompilePool(max_workers=1)
    yield p
    p.close()


def compile_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("constraint-compile", "constraint-prewarm")]


def settle(pool: CompilePool, timeout: float = 10.0) -> None:
    """Wait until the compile threads ended and the replacement worker (if any) started."""
    end = time.monotonic() + timeout
    while compile_threads() and time.monotonic() < end:
        time.sleep(0.02)
    assert not compile_threads(), "a compile thread is still running"
    assert pool.wait_idle(timeout)


def assert_worker_gone(pid: int) -> None:
    if psutil.pid_exists(pid):  # reaped at once; a zombie would also mean not running
        assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def cpu_seconds(procs) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def assert_idle(pool: CompilePool, parent_max: float = 0.5, window: float = 1.0) -> None:
    """No compile runs any more: the workers are idle, and this process is not burning a core
    (an abandoned compile thread used to keep one busy for ~30 s)."""
    assert pool.info()["busy"] == 0
    me = psutil.Process()
    workers = [psutil.Process(pid) for pid in pool.pids()["idle"]]
    w0, p0 = cpu_seconds(workers), cpu_seconds([me])
    time.sleep(window)
    w1, p1 = cpu_seconds(workers), cpu_seconds([me])
    assert w1 - w0 < 0.1 * window, f"an idle compile worker used {w1 - w0:.2f} s of CPU in {window} s"
    assert p1 - p0 < parent_max * window, f"this process used {p1 - p0:.2f} s of CPU in {window} s"


# ------------------------------------------------------------------------------- budget
def test_optional_properties_over_the_regex_budget_are_refused_fast(tok, pool):
    cc = ConstraintCompiler(tok, pool=pool)
    cc.compile(spec(SMALL))  # worker warm, vocabulary loaded
    pid = pool.pids()["idle"][0]
    t0 = time.perf_counter()
    with pytest.raises(ConstraintTooComplex) as ei:
        cc.compile(spec(optional_props(300)), timeout=30)
    elapsed = time.perf_counter() - t0
    msg = str(ei.value)
    assert msg.startswith("schema too complex")
    assert "regex of at least" in msg and "the limit is 100,000" in msg and "--max-constraint-regex" in msg
    assert "object at / of the JSON schema: 300 properties, none required" in msg
    assert elapsed < 1.0, f"refusing took {elapsed:.2f} s"
    # refused by the budget, not by killing anything: the same worker serves the next compile
    assert pool.info()["killed"] == 0 and pool.pids()["idle"] == [pid]
    assert cc.compile(spec(OTHER)).kind == "json_schema"


def test_state_and_transition_budgets_name_their_limit(tok, pool):
    cc = ConstraintCompiler(tok, pool=pool, limits=ConstraintLimits(max_states=1000))
    with pytest.raises(ConstraintTooComplex) as ei:
        cc.compile(spec(long_strings(60)), timeout=30)  # 1,659 states
    assert "automaton of 1,659 states; the limit is 1,000" in str(ei.value)
    assert "--max-constraint-states" in str(ei.value)

    cc.configure(limits=ConstraintLimits(max_transitions=50_000))
    with pytest.raises(ConstraintTooComplex) as ei:
        cc.compile(spec(long_strings(60)), timeout=30)
    assert "token index of about" in str(ei.value) and "the limit is 50,000" in str(ei.value)
    assert "--max-constraint-transitions" in str(ei.value)

    # the default state budget scales with the vocabulary
    assert ConstraintLimits().states_for(49152) == 10172 and ConstraintLimits().states_for(400) == 1_250_000
    cc.configure(limits=ConstraintLimits())
    c = cc.compile(spec(long_strings(60)), timeout=60)
    assert c.compile_stats["states"] == 1659 and len(c.index.get_transitions()) == 1659
    assert pool.info()["killed"] == 0


def test_tool_set_budget_names_the_tool(tok, pool):
    cc = ConstraintCompiler(tok, pool=pool)
    tools = [{"name": "small", "parameters": SMALL}, {"name": "big", "parameters": optional_props(120)}]
    with pytest.raises(ConstraintTooComplex) as ei:
        cc.compile(ConstraintSpec(kind="tools", tools=tools, tool_choice="required"), timeout=30)
    msg = str(ei.value)
    assert "the tool set compiles to a regex" in msg
    assert "parameters schema of tool 'big': 120 properties, none required" in msg
    # only the chosen tool is compiled: the small one alone is fine
    c = cc.compile(
        ConstraintSpec(kind="tools", tools=tools, tool_choice={"type": "function", "function": {"name": "small"}})
    )
    assert c.tool_names == ("small",)


def test_ordinary_schemas_are_within_the_default_budget(tok, pool):
    cc = ConstraintCompiler(tok, pool=pool)
    ordinary = [
        SMALL,
        optional_props(30),
        {"type": "object", "properties": {"e": {"enum": [f"value_{i}" for i in range(300)]}}, "required": ["e"]},
        {"type": "array", "items": {"type": "integer"}, "maxItems": 50},
        {
            "type": "object",
            "properties": {f"p{i}": {"type": "integer"} for i in range(100)},
            "required": [f"p{i}" for i in range(100)],
        },
    ]
    for schema in ordinary:
        c = cc.compile(spec(schema), timeout=60)
        assert c.compile_stats["states"] > 0
    many = [{"name": f"tool_{i}", "parameters": SMALL} for i in range(12)]
    cc.compile(ConstraintSpec(kind="tools", tools=many, tool_choice="auto"), timeout=60)
    cc.compile(ConstraintSpec(kind="json_object"), timeout=120)  # the server's regex: no budget
    assert pool.info()["killed"] == 0 and pool.info()["died"] == 0


# ------------------------------------------------------------------------------- timeout
def test_a_compile_past_its_timeout_is_killed_and_leaves_nothing_running(tok, pool):
    cc = ConstraintCompiler(tok, pool=pool)
    cc.compile(spec(SMALL))
    settle(pool)
    [pid] = pool.pids()["idle"]
    me = psutil.Process()
    rss0 = me.memory_info().rss
    t0 = time.perf_counter()
    with pytest.raises(ConstraintTooComplex) as ei:
        cc.compile(spec(long_strings(2000)), timeout=0.5)
    elapsed = time.perf_counter() - t0
    assert "took longer than 0.5s" in str(ei.value) and "--compile-timeout" in str(ei.value)
    assert elapsed < 5, f"the timeout took {elapsed:.2f} s to report"
    # the worker that was compiling is gone, on return already
    assert pool.killed_pids == [pid] and pool.info()["killed"] == 1
    assert_worker_gone(pid)
    settle(pool)
    assert_idle(pool)
    grown = (me.memory_info().rss - rss0) / 2**20
    assert grown < 30, f"RSS grew by {grown:.0f} MiB"
    assert cc.cache_info()["inflight"] == 0
    # a fresh warm worker serves the next compile
    [fresh] = pool.pids()["idle"]
    assert fresh != pid
    c = cc.compile(spec(OTHER))
    st = c.new_state()
    for tid in tok.encode('{"ok":true,"tag":"a"}'):
        st.advance(tid)
    assert st.is_complete
    assert pool.pids()["idle"] == [fresh] and pool.info()["started"] == 2


def test_json_object_is_never_killed(tok, pool):
    """The server's own regex: a caller whose timeout passes gets ConstraintBusy (429) and the
    compile goes on into the cache, for the retry."""
    cc = ConstraintCompiler(tok, pool=pool)
    with pytest.raises(ConstraintBusy, match="still being compiled"):
        cc.compile(ConstraintSpec(kind="json_object"), timeout=0.01)
    c = cc.compile(ConstraintSpec(kind="json_object"), timeout=120)
    assert cc.compile(ConstraintSpec(kind="json_object"), timeout=0.01) is c
    assert pool.info()["killed"] == 0


def test_busy_compiler_is_reported_as_busy(tok, pool):
    cc = ConstraintCompiler(tok, pool=pool)
    cc.compile(spec(SMALL))
    errors = {}

    def slow():
        try:
            cc.compile(spec(long_strings(2000)), timeout=1.5)
        except ConstraintTooComplex as e:
            errors["slow"] = e

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.3)
    with pytest.raises(ConstraintBusy) as ei:  # the only worker is taken
        cc.compile(spec(OTHER), timeout=0.3)
    assert ei.value.retry_after == 1 and "busy" in str(ei.value)
    t.join(30)
    assert "took longer than 1.5s" in str(errors["slow"])
    settle(pool)
    assert cc.compile(spec(OTHER)).kind == "json_schema"


def test_worker_memory_limit(tok):
    pool = CompilePool(max_workers=1, memory_limit=200 << 20)
    try:
        cc = ConstraintCompiler(tok, pool=pool, limits=ConstraintLimits(max_regex_chars=0))
        nested = {"type": "string"}
        for depth in range(4):  # 140 KB of schema, a 117 M character regex
            nested = {"type": "object", "properties": {f"p{depth}_{i}": nested for i in range(8)}}
        with pytest.raises(ConstraintTooComplex) as ei:
            cc.compile(spec(nested), timeout=60)
        assert "memory limit of 0.195 GiB" in str(ei.value)
        assert pool.info()["died"] == 1
        settle(pool)
        assert cc.compile(spec(SMALL)).kind == "json_schema"
    finally:
        pool.close()


# ------------------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = make_engine(tiny_model_dir)
    yield eng
    eng.stop()


def chat(client, schema, **kw):
    return client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 40,
            "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            **kw,
        },
    )


def test_http_timeout_kills_the_compile_and_the_server_carries_on(engine):
    pool = engine.constraints.pool
    with serve_engine(engine, compile_timeout=0.5) as srv, httpx.Client(base_url=srv.base_url, timeout=60) as c:
        r = chat(c, SMALL)
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), SMALL)
        settle(pool)
        killed0 = pool.info()["killed"]
        workers_before = set(pool.pids()["idle"])
        me = psutil.Process()
        rss0 = me.memory_info().rss

        r = chat(c, long_strings(2000))
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "schema_too_complex" and err["param"] == "response_format"
        assert "took longer than 0.5s" in err["message"]
        assert pool.info()["killed"] == killed0 + 1
        pid = pool.killed_pids[-1]
        assert pid in workers_before
        assert_worker_gone(pid)
        settle(pool)
        assert_idle(pool)
        grown = (me.memory_info().rss - rss0) / 2**20
        assert grown < 30, f"RSS grew by {grown:.0f} MiB"

        # over the budget: refused before compiling, naming the limit
        r = chat(c, optional_props(300))
        assert r.status_code == 400 and r.json()["error"]["code"] == "schema_too_complex"
        assert "--max-constraint-regex" in r.json()["error"]["message"]

        r = chat(c, OTHER)
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), OTHER)


# ------------------------------------------------------------------------------- flags
def test_cli_flags_reach_the_compiler(tok):
    p = argparse.ArgumentParser()
    _serve_parser(p)
    s = resolve_serve_args(p.parse_args([]))
    assert (s["compile_timeout"], s["compile_workers"], s["compile_memory_gb"]) == (10.0, 2, 4.0)
    assert (s["max_constraint_regex"], s["max_constraint_states"], s["max_constraint_transitions"]) == (
        100_000,
        None,
        10_000_000,
    )
    s = resolve_serve_args(
        p.parse_args(
            [
                "--compile-timeout",
                "2.5",
                "--compile-workers",
                "3",
                "--compile-memory-gb",
                "1",
                "--max-constraint-regex",
                "5000",
                "--max-constraint-states",
                "0",
                "--max-constraint-transitions",
                "7",
            ]
        )
    )
    pool = CompilePool(max_workers=1)
    try:
        fake = argparse.Namespace(constraints=ConstraintCompiler(tok, pool=pool))
        _configure_constraints(fake, s)
        lim = fake.constraints.limits
        assert (lim.max_regex_chars, lim.states_for(400), lim.max_transitions) == (5000, None, 7)
        assert pool.max_workers == 3 and pool.memory_limit == 1 << 30
        assert s["compile_timeout"] == 2.5
        settle(pool)  # the json_object prewarm
        assert fake.constraints.cache_info()["size"] == 1
    finally:
        pool.close()
