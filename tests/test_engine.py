"""Engine API tests on the tiny model: batching, per-row parameters, cancellation, admission."""

from __future__ import annotations

import asyncio

import pytest
from conftest import make_engine

from engine.detokenize import IncrementalDetokenizer, StopStringMatcher
from engine.request import GenerationRequest, SamplingParams
from engine.scheduler import EngineOverloaded

PROMPTS = [
    "Hello there",
    "The capital of France",
    "Tell me about emoji 😀🎉",
    "def add(a, b):",
    "Numbers 1 2 3",
    "Café au lait",
    "日本語",
    "The quick brown fox",
]


def prompt_ids(engine, text: str) -> list[int]:
    return engine.render_prompt([{"role": "user", "content": text}])


async def collect(engine, ids, params, rid="r"):
    events = []
    async for ev in engine.generate(GenerationRequest(rid, ids, params)):
        events.append(ev)
    return events


def result(events):
    return ("".join(e.text for e in events), [t for e in events for t in e.token_ids], events[-1].finish_reason)


@pytest.fixture(scope="module", params=[True, False], ids=["packed", "unpacked"])
def engine(request, tiny_model_dir):
    # packed: prompt chunks ride in the decode forward (engine/packed.py); unpacked: the fallback
    eng = make_engine(tiny_model_dir, max_running=32, max_waiting=64, packed=request.param)
    assert eng.packed == request.param  # the packed self-test passes on the tiny Llama
    yield eng
    eng.stop()


def test_packed_steps_give_the_tokens_of_plain_generate(tiny_model_dir):
    """Engine greedy output (prefill chunked and packed with a decode row) == model.generate."""
    import torch

    eng = make_engine(tiny_model_dir, prefill_chunk=5)
    try:
        ids = prompt_ids(eng, "The quick brown fox")
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

        async def two():  # a second request decodes while this one's prompt is prefilled in chunks
            return await asyncio.gather(
                collect(eng, prompt_ids(eng, "Hello there"), params, "other"), collect(eng, ids, params, "target")
            )

        got = result(asyncio.run(two())[1])[1]
        with torch.inference_mode():
            ref = eng.model.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert got == ref[0, len(ids) :].tolist()
    finally:
        eng.stop()


def test_greedy_alone_equals_inside_a_mixed_batch_of_16(engine):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    target = prompt_ids(engine, "Tell me about emoji 😀🎉")
    alone = result(asyncio.run(collect(engine, target, greedy)))

    async def batch():
        jobs = [collect(engine, target, greedy, "target")]
        for i in range(15):  # other rows: different lengths, samplers, stops, limits
            p = SamplingParams(
                temperature=[0, 0.7, 1.3][i % 3],
                top_p=[1.0, 0.9][i % 2],
                seed=i,
                max_tokens=5 + 3 * i,
                stop=["e"] if i % 4 == 0 else [],
                frequency_penalty=0.5 if i % 5 == 0 else 0.0,
            )
            jobs.append(collect(engine, prompt_ids(engine, PROMPTS[i % len(PROMPTS)] * (1 + i % 3)), p, f"o{i}"))
        return await asyncio.gather(*jobs)

    results = asyncio.run(batch())
    assert result(results[0]) == alone
    assert engine.stats["decode_rows"] > engine.stats["decode_steps"]  # rows really were batched


def test_each_row_behaves_as_alone_in_a_batch(engine):
    cases = [
        ("Hello there", SamplingParams(temperature=1.0, seed=1, max_tokens=20)),
        ("Hello there", SamplingParams(temperature=1.0, seed=2, max_tokens=20)),
        ("The quick brown fox", SamplingParams(temperature=0.5, top_p=0.8, seed=3, max_tokens=15)),
        ("Café au lait", SamplingParams(temperature=0, max_tokens=7)),
        ("Numbers 1 2 3", SamplingParams(temperature=0, max_tokens=30, presence_penalty=1.5)),
        ("def add(a, b):", SamplingParams(temperature=0, max_tokens=30, stop=["a", "b"])),
    ]
    alone = [result(asyncio.run(collect(engine, prompt_ids(engine, t), p))) for t, p in cases]

    async def together():
        return await asyncio.gather(
            *[collect(engine, prompt_ids(engine, t), p, str(i)) for i, (t, p) in enumerate(cases)]
        )

    together_results = [result(r) for r in asyncio.run(together())]
    assert together_results == alone
    assert alone[0][0] != alone[1][0]  # seeds matter
    assert alone[3][2] == "length" and len(alone[3][1]) == 7
    assert "a" not in alone[5][0] and "b" not in alone[5][0]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_a_sliding_window_model_gives_the_tokens_of_generate(tiny_model_dir, tmp_path, packed):
    """Paged attention applies the window the model passes it: prompt and output longer than it. The
    fallback path too, whose batch cache once took its length from a windowed layer's cache (which
    keeps only the window): two rows of different lengths then failed to join, failing every row."""
    import json
    import shutil

    import torch

    folder = tmp_path / "windowed"
    shutil.copytree(tiny_model_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    # Qwen2 (the tiny Llama's weights, plus zero q/k/v biases) with one windowed and one full layer
    cfg.update(
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        sliding_window=8,
        use_sliding_window=True,
        max_window_layers=2,
        layer_types=["sliding_attention", "full_attention"],
    )
    (folder / "config.json").write_text(json.dumps(cfg))
    eng = make_engine(folder, prefill_chunk=7, packed=packed)
    try:
        assert eng.packed is packed
        ids = prompt_ids(eng, "The quick brown fox jumps over")
        params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

        async def two():  # a decoding row beside the chunked prompt
            return await asyncio.gather(
                collect(eng, prompt_ids(eng, "Hello there"), params, "other"), collect(eng, ids, params, "target")
            )

        other, target = asyncio.run(two())
        assert len(ids) > 8 and target[-1].finish_reason == other[-1].finish_reason == "length"
        with torch.inference_mode():
            eng.model.set_attn_implementation("sdpa")
            ref = eng.model.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert result(target)[1] == ref[0, len(ids) :].tolist()
    finally:
        eng.stop()


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_gemma4_kv_shared_layers_give_the_tokens_of_generate(tmp_path, packed):
    """Gemma 4's text model: its head size differs between sliding and full layers, and its last two
    layers reuse the first two's keys and values. Three rows of different lengths, each past the
    16-token window, decode together (prompts in 7-token chunks on the paged path) and each gives
    model.generate's tokens. In the pool the reusing layers hold no slots."""
    import torch
    from tiny_models import build_tiny_gemma4_text

    eng = make_engine(build_tiny_gemma4_text(tmp_path / "gemma4"), packed=packed, prefill_chunk=7)
    try:
        assert eng.packed is packed
        if packed:
            sizes = [tuple(k.shape) for k in eng.pool.keys]
            slots = eng.pool.num_blocks * eng.pool.block_size
            assert sizes == [(slots, 2, 16), (slots, 2, 512), (0, 0, 0), (0, 0, 0)]
        prompts = [prompt_ids(eng, "Hello there, tell me a story about " * k) for k in (1, 3, 6)]
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

        async def together():
            return await asyncio.gather(*[collect(eng, ids, params, str(i)) for i, ids in enumerate(prompts)])

        got = [result(events)[1] for events in asyncio.run(together())]
        assert eng.stats["decode_rows"] > eng.stats["decode_steps"]  # the rows were batched
        with torch.inference_mode():
            if packed:
                eng.model.set_attn_implementation("sdpa")
            for ids, tokens in zip(prompts, got):
                ref = eng.model.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False)
                assert len(ids) > 16 and tokens == ref[0, len(ids) :].tolist()
    finally:
        eng.stop()


def test_prefix_cache_reuses_shared_prompt_starts(tiny_model_dir, engine):
    if not engine.packed:
        pytest.skip("the fallback path keeps no prefix cache")
    system = {"role": "system", "content": " ".join(PROMPTS)}
    prompts = [engine.render_prompt([system, {"role": "user", "content": q}]) for q in PROMPTS[:4]]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    cold = make_engine(tiny_model_dir, prefix_cache=False, packed=engine.packed)
    try:
        expected = [result(asyncio.run(collect(cold, ids, params))) for ids in prompts]
        assert cold.stats["prefill_tokens"] == sum(len(ids) for ids in prompts)
    finally:
        cold.stop()
    before = engine.stats["prefill_tokens"]
    runs = [asyncio.run(collect(engine, ids, params)) for ids in prompts]
    assert [result(r) for r in runs] == expected  # same tokens as without the cache
    cached = [r[-1].cached_tokens for r in runs]
    shared = len(engine.render_prompt([system]))  # the system turn, at least
    assert all(c >= (shared // 16) * 16 for c in cached[1:])
    assert engine.stats["prefill_tokens"] - before == sum(len(ids) for ids in prompts) - sum(cached)
    # the same prompt again: everything but the last (partial) block comes from the cache
    again = asyncio.run(collect(engine, prompts[0], params))
    assert result(again) == expected[0]
    assert again[-1].cached_tokens == ((len(prompts[0]) - 1) // 16) * 16


def test_chunked_prefill_gives_the_same_tokens(tiny_model_dir, engine):
    ids = prompt_ids(engine, " ".join(PROMPTS * 2))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    whole = result(asyncio.run(collect(engine, ids, params)))
    small = make_engine(tiny_model_dir, prefill_chunk=7)
    try:
        chunked = result(asyncio.run(collect(small, ids, params)))
        assert small.stats["prefill_tokens"] == len(ids)
    finally:
        small.stop()
    assert len(ids) > 7 * 3
    assert chunked == whole


def test_cancelled_streams_leave_the_batch(engine):
    params = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)

    async def scenario():
        streams = [
            engine.generate(GenerationRequest(f"c{i}", prompt_ids(engine, PROMPTS[i % 8]), params)) for i in range(12)
        ]
        for s in streams:  # everyone has produced a token: all are running
            await s.__anext__()
        assert engine.num_running == 12
        for s in streams[:5]:
            await s.aclose()  # what a client disconnect does
        for _ in range(3):  # a few more tokens for the survivors
            await asyncio.gather(*[s.__anext__() for s in streams[5:]])
        running_after = engine.num_running
        rest = await asyncio.gather(*[_drain(s) for s in streams[5:]])
        return running_after, rest

    running_after, rest = asyncio.run(scenario())
    assert running_after == 7
    assert all(ev[-1].finish_reason == "length" and ev[-1].completion_tokens == 150 for ev in rest)
    assert engine.num_running == 0


async def _drain(stream):
    return [ev async for ev in stream]


def test_admission_limits_refuse_the_excess(tiny_model_dir):
    small = make_engine(tiny_model_dir, max_running=2, max_waiting=2)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    try:

        async def burst():
            async def one(i):
                try:
                    return await collect(small, prompt_ids(small, PROMPTS[i % 8]), params, str(i))
                except EngineOverloaded as exc:
                    return exc

            return await asyncio.gather(*[one(i) for i in range(10)])

        outcomes = asyncio.run(burst())
    finally:
        small.stop()
    refused = [o for o in outcomes if isinstance(o, EngineOverloaded)]
    done = [o for o in outcomes if not isinstance(o, EngineOverloaded)]
    assert len(refused) == 6 and all(r.retry_after >= 1 for r in refused)
    assert len(done) == 4 and all(ev[-1].completion_tokens == 20 for ev in done)


def test_queue_timeout_fails_waiting_requests(tiny_model_dir):
    small = make_engine(tiny_model_dir, max_running=1, max_waiting=4, queue_timeout=0.1)
    ids = prompt_ids(small, "Hello")
    long = SamplingParams(temperature=0, max_tokens=250 - len(ids), ignore_eos=True)
    try:

        async def scenario():
            first = small.generate(GenerationRequest("a", ids, long))
            head = await first.__anext__()  # "a" holds the only running slot
            second = await collect(small, ids, long, "b")
            return [head] + await _drain(first), second

        first, second = asyncio.run(scenario())
    finally:
        small.stop()
    assert second[-1].finish_reason == "error" and second[-1].error == "queue_timeout"
    assert first[-1].finish_reason == "length"


def test_min_tokens_and_ignore_eos_hold_off_eos(engine):
    ids = prompt_ids(engine, "Hello there")
    ev = asyncio.run(collect(engine, ids, SamplingParams(temperature=0, max_tokens=40, min_tokens=40)))
    assert ev[-1].completion_tokens == 40 and ev[-1].finish_reason == "length"


# ---------------------------------------------------------------- detokenization and stop strings


def test_detokenizer_never_emits_a_split_character(engine):
    tok = engine.tokenizer
    text = "日本語のテキスト 😀🎉🚀 café"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens are partial bytes
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_detokenized_text_is_the_tokenizers_decode_and_a_tokenizer_that_decodes_its_own_way_keeps_it(engine):
    """The detokenizer calls the tokenizers library directly where transformers' decode only wraps it;
    the text is the same (special tokens skipped), and a tokenizer class with a decode of its own
    is still decoded by it."""
    import copy

    tok = engine.tokenizer
    ids = tok("Hello there, café 😀", add_special_tokens=False)["input_ids"]
    ids = ids + [tok.eos_token_id] + tok(" and more", add_special_tokens=False)["input_ids"]

    def detokenized(t):
        detok = IncrementalDetokenizer(t)
        return "".join(detok.add(i) for i in ids) + detok.flush()

    expected = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert detokenized(tok) == expected and "café 😀" in expected

    class Shouting(type(tok)):
        def _decode(self, token_ids, **kwargs):
            return super()._decode(token_ids, **kwargs).upper()

    loud = copy.copy(tok)
    loud.__class__ = Shouting
    assert detokenized(loud) == expected.upper() != expected


@pytest.mark.parametrize(
    "pieces, stops, expected, stopped",
    [
        (["Hel", "lo wor", "ld"], ["lo w"], "Hel", True),
        (["a", "b", "c", "d"], ["bcd"], "a", True),
        (["ab", "ab", "ab"], ["abc"], "ababab", False),
        (["The END", " of it"], ["END", "xyz"], "The ", True),
        (["no stop here"], [], "no stop here", False),
    ],
)
def test_stop_strings_spanning_pieces(pieces, stops, expected, stopped):
    m = StopStringMatcher(stops)
    out, hit = "", False
    for p in pieces:
        text, hit = m.feed(p)
        out += text
        if hit:
            break
    if not hit:
        out += m.flush()
    assert (out, hit) == (expected, stopped)


def test_stop_holdback_releases_text_that_cannot_start_a_stop():
    m = StopStringMatcher(["STOP"])
    assert m.feed("hello S") == ("hello ", False)  # "S" might begin "STOP": held
    assert m.feed("T") == ("", False)
    assert m.feed("x") == ("STx", False)  # it did not: released


def test_a_full_pool_preempts_and_every_request_finishes_with_its_own_tokens(tiny_model_dir):
    """12 blocks of 16 tokens for 8 requests of ~70 tokens each: the newest are preempted (blocks
    freed, recomputed later) instead of failing, and each gets the tokens it gets alone."""
    roomy = make_engine(tiny_model_dir)
    small = make_engine(tiny_model_dir, kv_cache_blocks=13, max_running=8)
    try:
        assert small.max_model_len == 12 * 16  # the pool caps the context
        cases = [
            (
                prompt_ids(roomy, PROMPTS[i]),
                SamplingParams(temperature=0 if i % 2 else 0.8, seed=i, max_tokens=48, ignore_eos=True),
            )
            for i in range(8)
        ]
        alone = [result(asyncio.run(collect(roomy, ids, p))) for ids, p in cases]

        async def together():
            return await asyncio.gather(*[collect(small, ids, p, str(i)) for i, (ids, p) in enumerate(cases)])

        got = [result(r) for r in asyncio.run(together())]
        assert got == alone
        assert small.stats["preemptions"] > 0
        assert small.stats["kv_blocks_used"] == 0  # every block came back
    finally:
        roomy.stop()
        small.stop()


class _FaultyConstraint:
    """A constraint that raises in its mask (sampling) or its advance (postprocessing) at step ``at``."""

    def __init__(self, where: str, at: int = 2):
        self.where, self.at, self.steps = where, at, 0

    def mask_logits(self, row):
        if self.where == "mask" and self.steps >= self.at:
            raise RuntimeError("injected mask fault")
        return row

    def advance(self, token_id):
        self.steps += 1
        if self.where == "advance" and self.steps >= self.at:
            raise RuntimeError("injected advance fault")


@pytest.mark.parametrize("fault", ["mask", "advance", "detokenize", "stop"])
def test_a_fault_in_one_row_fails_that_request_alone(engine, fault, monkeypatch):
    """Sampling, constraint, detokenizer or stop-matcher faults in one row: that request ends with an
    error, every other row of the same steps gets the tokens it gets alone, and the engine serves on."""
    from engine import detokenize

    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    others = [prompt_ids(engine, p) for p in PROMPTS[:4]]
    alone = [result(asyncio.run(collect(engine, ids, greedy))) for ids in others]
    bad_ids = prompt_ids(engine, "A request that goes wrong")
    constraint = None
    if fault in ("mask", "advance"):
        constraint = _FaultyConstraint(fault)
    else:  # the victim's detokenizer / stop matcher raises from its 3rd call on
        cls = detokenize.IncrementalDetokenizer if fault == "detokenize" else detokenize.StopStringMatcher
        method = "add" if fault == "detokenize" else "feed"
        original, real_init = getattr(cls, method), cls.__init__
        calls: dict[int, int] = {}  # id(victim object) -> calls so far

        def marking_init(self, *a, **kw):
            real_init(self, *a, **kw)
            key = list(a[1]) == bad_ids if fault == "detokenize" else list(a[0]) == ["<victim>"]
            if key:
                calls[id(self)] = 0

        def faulty(self, *a, **kw):
            if id(self) in calls:
                calls[id(self)] += 1
                if calls[id(self)] >= 3:
                    raise RuntimeError(f"injected {fault} fault")
            return original(self, *a, **kw)

        monkeypatch.setattr(cls, "__init__", marking_init)
        monkeypatch.setattr(cls, method, faulty)
    bad_params = greedy.replace(stop=["<victim>"]) if fault == "stop" else greedy

    async def together():
        bad = _collect_request(engine, GenerationRequest("bad", bad_ids, bad_params, constraint=constraint))
        return await asyncio.gather(bad, *[collect(engine, ids, greedy, f"o{i}") for i, ids in enumerate(others)])

    bad_events, *rest = asyncio.run(together())
    assert bad_events[-1].finish_reason == "error" and "injected" in bad_events[-1].error
    assert [result(r) for r in rest] == alone
    monkeypatch.undo()
    after = asyncio.run(collect(engine, others[0], greedy))
    assert result(after) == alone[0]


async def _collect_request(engine, request):
    return [ev async for ev in engine.generate(request)]


def test_a_fault_in_the_shared_forward_fails_that_step_and_the_engine_serves_on(engine, monkeypatch):
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ids = prompt_ids(engine, "The quick brown fox")
    alone = result(asyncio.run(collect(engine, ids, greedy)))
    real = engine.model.forward
    state = {"calls": 0}

    def flaky(*a, **kw):
        state["calls"] += 1
        if state["calls"] == 3:
            raise RuntimeError("injected device fault")
        return real(*a, **kw)

    monkeypatch.setattr(engine.model, "forward", flaky)

    async def two():
        return await asyncio.gather(collect(engine, ids, greedy, "a"), collect(engine, ids, greedy, "b"))

    hit = asyncio.run(two())
    assert all(r[-1].finish_reason == "error" and "injected device fault" in r[-1].error for r in hit)
    monkeypatch.undo()
    assert result(asyncio.run(collect(engine, ids, greedy))) == alone
    if engine.packed:
        assert engine.stats["kv_blocks_used"] == 0


@pytest.fixture(scope="module")
def chunked_engine(tiny_model_dir):
    eng = make_engine(tiny_model_dir, prefill_chunk=16)
    yield eng
    eng.stop()


def test_prompt_logprobs_equal_log_softmax_of_the_model_logits_alone_and_in_a_busy_batch(chunked_engine):
    """Scoring a prompt (max_tokens 0) returns log_softmax of the model's own logits at every
    position, over several prefill chunks, alone or beside decoding rows; generation after scoring
    is unchanged."""
    import torch

    engine = chunked_engine
    assert engine.scores_prompts
    ids = prompt_ids(engine, " ".join(PROMPTS))
    assert len(ids) > 3 * 16
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    expected = [float(ref[p - 1, ids[p]]) for p in range(1, len(ids))]
    scoring = SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=2)

    def check(events):
        assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 0
        lps = events[0].prompt_logprobs
        assert len(lps) == len(ids) and lps[0] is None
        assert max(abs(e.logprob - x) for e, x in zip(lps[1:], expected)) < 1e-4
        top = [e.top_logprobs for e in lps[1:]]
        assert all(len(t) == 2 and abs(t[0].logprob - float(ref[i].max())) < 1e-4 for i, t in enumerate(top))

    check(asyncio.run(collect(engine, ids, scoring)))

    async def busy():  # decoding rows beside the scored prompt, a second scored prompt, one that generates
        greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        return await asyncio.gather(
            collect(engine, ids, scoring, "s1"),
            *[collect(engine, prompt_ids(engine, p), greedy, f"g{i}") for i, p in enumerate(PROMPTS[:4])],
            collect(engine, ids, scoring, "s2"),
            collect(engine, ids, greedy.replace(prompt_logprobs=0), "g-scored"),
        )

    results = asyncio.run(busy())
    check(results[0])
    check(results[5])
    generated = results[6]
    assert len(generated[0].prompt_logprobs) == len(ids)
    assert result(generated) == result(
        asyncio.run(collect(engine, ids, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)))
    )


def test_decode_steps_on_graph_buffers_give_the_eager_tokens(tiny_model_dir):
    """The CUDA-graph path's static buffers (emulated off CUDA: same buffers, padding and buckets,
    no capture): 11 requests of different lengths, so the batch shrinks through buckets 16, 8, 4,
    2, 1 as they finish, and a pool small enough to preempt: every request's tokens equal eager steps'."""
    cases = [
        (
            PROMPTS[i % len(PROMPTS)] * (1 + i % 3),
            SamplingParams(temperature=0 if i % 2 else 0.9, seed=i, max_tokens=4 + 5 * i, ignore_eos=True),
        )
        for i in range(11)
    ]

    def run(engine):
        async def go():
            return await asyncio.gather(
                *[collect(engine, prompt_ids(engine, t), p, f"r{i}") for i, (t, p) in enumerate(cases)]
            )

        return [result(r) for r in asyncio.run(go())]

    eager = make_engine(tiny_model_dir, decode_graphs="off", max_running=16)
    graphs = make_engine(tiny_model_dir, decode_graphs="emulate", max_running=16)
    tight = make_engine(tiny_model_dir, decode_graphs="emulate", max_running=16, kv_cache_blocks=24)
    try:
        assert eager.graphs is None and graphs.graphs.buckets == [1, 2, 4, 8, 16]
        assert (eager.config.max_newcomers, eager.config.prefill_chunk) == (1, 512)  # CPU defaults
        expected = run(eager)
        assert run(graphs) == expected
        assert graphs.stats["graph_steps"] > 0 and graphs.stats["graph_steps"] == graphs.graphs.replays
        assert run(tight) == expected
        assert tight.stats["preemptions"] > 0 and tight.stats["kv_blocks_used"] == 0
    finally:
        for e in (eager, graphs, tight):
            e.stop()


def test_graph_buckets_are_vllms():
    from engine.cuda_graphs import bucket_for, buckets_up_to

    assert buckets_up_to(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert buckets_up_to(12) == [1, 2, 4, 8, 12]
    assert buckets_up_to(1) == [1]
    assert [bucket_for(n, buckets_up_to(64)) for n in (1, 3, 5, 9, 17, 63)] == [1, 4, 8, 16, 24, 64]
