"""The constraint compiler: a :class:`~engine.request.ConstraintSpec` -> a
:class:`~engine.constraints.state.CompiledConstraint`, one compiler per model/tokenizer.

``compile(spec)`` checks the spec in the caller's thread (:mod:`engine.constraints.schemas`),
then has a worker process (:mod:`engine.constraints.compile_worker`) write the schemas' regexes
and build the outlines_core ``Index`` of ``(regex)END``, within the complexity budget
(:mod:`engine.constraints.limits`) and a timeout. Results are kept in an LRU cache, and callers
of a spec that is still compiling wait on that one compilation.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import threading
import time
from collections import OrderedDict

from ..request import ConstraintSpec
from ..tools import FAMILIES, detect_family, get_format, normalize_tools
from .compile_worker import CompilePool, CompilerBusy, CompilerUnavailable, CompileTimeout, WorkerDied, default_pool
from .errors import ConstraintBusy, ConstraintError, ConstraintTooComplex
from .limits import ConstraintLimits
from .regexes import DEFAULT_WHITESPACE, build_json_object_regex, tool_calls_regex
from .schemas import check_representable, check_schema, check_tools, enforceable_schema
from .state import CompiledConstraint
from .vocabulary import END, SENTINEL_ID, get_token_vocab

__all__ = ["ConstraintCompiler"]


def _canonical(obj) -> str:
    # Key order is kept on purpose: outlines emits object properties in schema order,
    # so two schemas differing only in property order compile to different regexes.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


_JOB_GRACE = 30.0  # how long past its deadline a caller waits for a job to report (kill + reap)


class _Job:
    __slots__ = ("fut", "deadline", "timeout", "kind")

    def __init__(self, deadline, timeout, kind):
        self.fut = concurrent.futures.Future()
        self.deadline = deadline
        self.timeout = timeout
        self.kind = kind


def _optional_hotspot(schema, path: str = ""):
    """(property count, path) of the object with the most properties and none required (the
    shape whose outlines regex grows with the square of its size), or (0, "")."""
    best = (0, "")
    todo = [(schema, path)]
    while todo:
        node, p = todo.pop()
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict) and len(props) > best[0] and not node.get("required"):
                best = (len(props), p or "/")
            todo.extend((v, f"{p}/{k}") for k, v in node.items())
        elif isinstance(node, list):
            todo.extend((v, f"{p}/{i}") for i, v in enumerate(node))
    return best


class ConstraintCompiler:
    """Compiles ConstraintSpecs for one tokenizer (one per model).

    vocab_size: the model's logits size (informational; masks follow the row size).
    eos_token_ids: the ids that end a constrained output (default: the tokenizer's EOS).

    whitespace_pattern: regex for the whitespace allowed between JSON tokens (default
      ``[ ]?``: at most one space, so a small model cannot loop on whitespace).
    family: tool-call family (default: detect_family(tokenizer)).
    max_parallel_calls: bound on calls when parallel_tool_calls is on (after that many
      complete calls only EOS is allowed; one more can slip through only when a single
      token ends one call and starts the next).
    cache_size: LRU size (compiled constraints).
    max_abandoned: kept for compatibility; unused (a compile past its timeout is killed, none
      keeps running).
    json_object_regex: override the regex used for kind "json_object"
      (default :func:`build_json_object_regex`).
    limits: the complexity budget (:class:`ConstraintLimits`; default: its defaults).
    pool: the compile worker pool (default: the process-wide
      :func:`engine.constraints.compile_worker.default_pool`).
    """

    def __init__(
        self,
        tokenizer,
        *,
        vocab_size: int | None = None,
        eos_token_ids=None,
        family: str | None = None,
        whitespace_pattern: str = DEFAULT_WHITESPACE,
        max_parallel_calls: int = 8,
        cache_size: int = 64,
        max_abandoned: int = 4,
        json_object_regex: str | None = None,
        limits: ConstraintLimits | None = None,
        pool: CompilePool | None = None,
    ):
        self.tokenizer = tokenizer
        self.vocab = get_token_vocab(tokenizer, eos_token_ids)
        # the model's logits size (may exceed the tokenizer's); masks are sized from the
        # logits row itself, ids at or beyond it are dropped, the extra ones always banned
        self.vocab_size = vocab_size
        self.family = family or detect_family(tokenizer)
        get_format(self.family)
        self.ws = whitespace_pattern
        self.json_object_regex = json_object_regex or build_json_object_regex(whitespace_pattern)
        self.max_parallel_calls = max(1, int(max_parallel_calls))
        self.cache_size = cache_size
        self.max_abandoned = max_abandoned
        self.limits = limits or ConstraintLimits()
        self.pool = pool or default_pool()
        self._cache: OrderedDict = OrderedDict()
        self._inflight: dict = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        # a warm worker with this vocabulary loaded, so the first compile pays no start-up
        self.pool.ensure_warm(self.vocab.outlines_payload())

    def configure(
        self,
        *,
        limits: ConstraintLimits | None = None,
        workers: int | None = None,
        worker_memory_bytes: int | None | bool = False,
    ) -> None:
        """Set the complexity budget and the worker pool's size / memory limit (None: none)."""
        if limits is not None:
            self.limits = limits
        self.pool.configure(max_workers=workers, memory_limit=worker_memory_bytes)

    # -- public --------------------------------------------------------------------
    def compile(self, spec: ConstraintSpec, timeout: float | None = 10.0) -> CompiledConstraint:
        """Compile (or fetch from the cache) a constraint.

        Raises ConstraintError (bad spec / schema / unsupported feature) or
        ConstraintTooComplex (over a complexity limit, or not done within ``timeout``
        seconds: then the worker process compiling it has been killed, nothing keeps running;
        ConstraintBusy when no worker came free in time). A retry of a spec that is still
        compiling waits on the same compilation instead of starting another one.
        """
        key = self._key(spec)
        with self._lock:
            hit = self._cache.get(key) if key is not None else None
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
        key, build = self._plan(spec)  # validation only on a miss
        timeout = timeout if timeout and timeout > 0 else None
        deadline = time.monotonic() + timeout if timeout else None
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
            self.misses += 1
            job = self._inflight.get(key)
            if job is None:
                # json_object is the server's own regex (bounded, once per server, but ~3x longer
                # on 128k vocabularies): it is never killed, a caller's timeout only stops waiting
                job = _Job(None if spec.kind == "json_object" else deadline, timeout, spec.kind)
                self._inflight[key] = job
                threading.Thread(
                    target=self._worker, args=(key, build, job), daemon=True, name="constraint-compile"
                ).start()
        if job.deadline is not None and (deadline is None or job.deadline <= deadline):
            # the job ends by its own deadline (its worker killed): wait for that, so that on
            # return nothing of it is left running
            wait = max(0.0, job.deadline - time.monotonic()) + _JOB_GRACE
        else:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return job.fut.result(timeout=wait)
        except concurrent.futures.TimeoutError:
            # the job goes on (json_object, a prewarm, another caller's longer timeout)
            if spec.kind == "json_object":
                raise ConstraintBusy(
                    "the json_object constraint is still being compiled (once per server); retry in a few seconds",
                    retry_after=max(1, math.ceil(timeout or 1)),
                ) from None
            raise ConstraintTooComplex(
                f"schema too complex: compiling the {spec.kind} constraint took longer than {timeout:g}s"
            ) from None

    def prewarm(self, specs=None) -> None:
        """Start compiling ``specs`` (default: json_object), with no timeout, and return at
        once; a later compile() of the same spec waits for / reuses it."""
        for spec in specs or [ConstraintSpec(kind="json_object")]:
            key, build = self._plan(spec)
            with self._lock:
                if key in self._cache or key in self._inflight:
                    continue
                job = _Job(None, None, spec.kind)
                self._inflight[key] = job
                threading.Thread(
                    target=self._worker, args=(key, build, job), daemon=True, name="constraint-prewarm"
                ).start()

    def cache_info(self) -> dict:
        with self._lock:
            info = {
                "size": len(self._cache),
                "max": self.cache_size,
                "hits": self.hits,
                "misses": self.misses,
                "inflight": len(self._inflight),
                "abandoned": 0,
            }
        info["pool"] = self.pool.info()
        return info

    # -- internals -----------------------------------------------------------------
    def _worker(self, key, build, job: _Job) -> None:
        t0 = time.perf_counter()
        result = None
        try:
            result = build(job.deadline)
            result.compile_seconds = time.perf_counter() - t0
        except ConstraintError as e:
            err: BaseException = e
        except CompileTimeout:
            err = ConstraintTooComplex(
                f"schema too complex: compiling the {job.kind} constraint took longer than "
                f"{job.timeout:g}s (server limit --compile-timeout)"
            )
        except CompilerBusy as e:
            err = ConstraintBusy(
                f"the constraint compiler is busy: {e} for {job.timeout:g}s; retry later",
                retry_after=max(1, math.ceil(job.timeout or 1)),
            )
        except WorkerDied as e:
            err = ConstraintTooComplex(f"schema too complex: compiling the {job.kind} constraint failed: {e}")
        except CompilerUnavailable as e:  # a server fault: not a ConstraintError (a 500 upstream)
            err = e
        except BaseException as e:  # incl. pyo3 PanicException (a BaseException)
            err = ConstraintError(f"could not compile the constraint: {e}")
        with self._lock:
            self._inflight.pop(key, None)
            if result is not None:
                self._cache[key] = result
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        if result is not None:
            job.fut.set_result(result)
        else:
            job.fut.set_exception(err)

    def _schema_regexes(self, schemas: list, whats: list[str], deadline, where: str) -> list[str]:
        """outlines regexes of (enforceable) schemas, written in a worker; ConstraintTooComplex
        as soon as their total length passes the limit."""
        limit = self.limits.max_regex_chars or None
        status, payload = self.pool.call(("regexes", [_canonical(s) for s in schemas], self.ws, limit), deadline)
        if status == "ok":
            return payload
        if status == "schema_error":
            i, msg = payload
            raise ConstraintError(f"unsupported {whats[i]}: {msg}")
        if status == "limit":
            _, total, _i = payload
            msg = (
                f"schema too complex: {where} compiles to a regex of at least {total:,} "
                f"characters; the limit is {limit:,} (server limit --max-constraint-regex)"
            )
            (n, path), w = max(((_optional_hotspot(s), w) for s, w in zip(schemas, whats)), key=lambda t: t[0][0])
            if n >= 8:
                msg += (
                    f". The largest cost is the object at {path} of the {w}: {n} properties, "
                    "none required; outlines writes one alternative per property of such an "
                    "object, so its regex grows with the square of the property count: mark "
                    "properties required, or use fewer"
                )
            raise ConstraintTooComplex(msg)
        raise ConstraintError(f"could not compile the constraint: {payload}")

    def _index(self, regex: str, extra_ids=(), deadline=None, what: str = "the constraint", budget: bool = True):
        """(outlines_core Index of ``(regex)END``, stats), built in a worker process within
        ``deadline``; ``budget``: check the state / transition limits first."""
        lim = self.limits
        size = self.vocab.size
        max_states = lim.states_for(size) if budget else None
        max_trans = (lim.max_transitions or None) if budget else None
        vocab = self.vocab.outlines_payload(tuple(extra_ids))
        status, payload = self.pool.call(
            ("index", vocab[0], "(" + regex + ")" + END, END.encode("utf-8"), SENTINEL_ID, size, max_states, max_trans),
            deadline,
            vocab=vocab,
        )
        if status == "ok":
            return payload
        if status == "limit":
            which, n, limit = payload
            if which == "states":
                msg = (
                    f"schema too complex: {what} compiles to an automaton of {n:,} states; the "
                    f"limit is {limit:,} for this {size:,}-token vocabulary (server limit "
                    "--max-constraint-states). Long maxLength / maxItems / minItems, big enums "
                    "and many properties are what add states"
                )
            else:
                msg = (
                    f"schema too complex: {what} would need a token index of about {n:,} "
                    f"transitions; the limit is {limit:,} (server limit "
                    "--max-constraint-transitions). Every character a string may still take "
                    "(maxLength) is a state that allows nearly every token"
                )
            raise ConstraintTooComplex(msg)
        msg = payload if isinstance(payload, str) else str(payload)
        raise ConstraintError(f"could not compile the constraint: {msg}")

    def _key(self, spec: ConstraintSpec):
        """Cache key from the raw spec (no validation); None if not JSON-serialisable."""
        kind = getattr(spec, "kind", None)
        try:
            if kind == "json_object":
                return ("json_object",)
            if kind == "json_schema":
                return ("json_schema", _canonical(spec.schema))
            if kind == "tools":
                return (
                    "tools",
                    self.family,
                    _canonical(spec.tool_choice),
                    bool(spec.parallel_tool_calls),
                    _canonical(spec.tools),
                )
        except (TypeError, ValueError):
            return None
        return None

    def _plan(self, spec: ConstraintSpec):
        """Validate the spec (in the caller's thread) and return
        (cache key, build(deadline) run in a compile thread, the heavy part in a worker)."""
        kind = getattr(spec, "kind", None)
        key = self._key(spec)
        if key is None and kind in ("json_object", "json_schema", "tools"):
            raise ConstraintError(f"{kind} constraint is not valid JSON")
        if kind == "json_object":

            def build(deadline):
                rx = self.json_object_regex
                # the server's own regex: the timeout applies, the client budget does not
                index, stats = self._index(rx, (), deadline, "json_object", budget=False)
                c = CompiledConstraint(kind=kind, mode="full", vocab=self.vocab, index=index, regex=rx)
                c.compile_stats = stats
                return c

            return key, build
        if kind == "json_schema":
            schema = spec.schema
            check_schema(schema, "response_format json_schema")
            check_representable(schema, "response_format json_schema")
            schema = enforceable_schema(schema, "JSON schema")

            def build(deadline):
                (rx,) = self._schema_regexes([schema], ["JSON schema"], deadline, "the JSON schema")
                index, stats = self._index(rx, (), deadline, "the JSON schema")
                c = CompiledConstraint(kind=kind, mode="full", vocab=self.vocab, index=index, regex=rx)
                c.compile_stats = stats
                return c

            return key, build
        if kind == "tools":
            return key, self._plan_tools(spec)
        raise ConstraintError(f"unknown constraint kind {kind!r} (expected json_object, json_schema or tools)")

    def _plan_tools(self, spec: ConstraintSpec):
        params = check_tools(spec.tools)
        for i, t in enumerate(normalize_tools(spec.tools)):
            check_representable(t, f"tools[{i}] ({t['name']!r})")
        names = list(params)
        choice = spec.tool_choice if spec.tool_choice is not None else "auto"
        if isinstance(choice, dict):  # {"type":"function","function":{"name":...}}
            choice = (choice.get("function") or {}).get("name") or choice.get("name")
        if not isinstance(choice, str) or not choice:
            raise ConstraintError("tool_choice must be 'auto', 'required', 'none' or a tool name")
        fam = self.family
        if choice == "none":
            return lambda deadline: CompiledConstraint(
                kind="tools", mode="free", vocab=self.vocab, family=fam, tool_names=tuple(names)
            )
        if choice in ("auto", "required"):
            allowed = names
        elif choice in params:
            allowed = [choice]
        else:
            raise ConstraintError(f"tool_choice names an unknown function {choice!r} (defined: {', '.join(names)})")
        whats = [f"parameters schema of tool {n!r}" for n in allowed]
        schemas = [enforceable_schema(params[n], w) for n, w in zip(allowed, whats)]
        parallel = bool(spec.parallel_tool_calls)
        mode = "triggered" if choice == "auto" else "full"

        def build(deadline):
            fmt = FAMILIES[fam]
            args = self._schema_regexes(schemas, whats, deadline, "the tool set")
            rx = tool_calls_regex(fmt, allowed, args, self.ws, parallel)
            # the family's tag tokens (e.g. Qwen's <tool_call>) are allowed as single
            # tokens in the call syntax even if the tokenizer flags them special
            extra = []
            trig_ids = {}
            for tag in fmt.tag_tokens:
                tid = self.vocab.token_id_for_text(tag)
                if tid is not None and tid not in self.vocab.eos_token_ids:
                    if tid in self.vocab.special_ids:
                        extra.append(tid)
                    if tag in fmt.triggers:
                        trig_ids[tag.encode("utf-8")] = tid
            index, stats = self._index(rx, extra, deadline, "the tool set")
            c = CompiledConstraint(
                kind="tools",
                mode=mode,
                vocab=self.vocab,
                index=index,
                regex=rx,
                max_calls=self.max_parallel_calls if parallel else 1,
                triggers=tuple(t.encode("utf-8") for t in fmt.triggers),
                triggers_at_start_only=fmt.triggers_at_start_only,
                trigger_token_ids=trig_ids,
                tag_token_ids=extra,
                family=fam,
                tool_names=tuple(allowed),
            )
            c.compile_stats = stats
            return c

        return build
