"""device_map: a model spread over several GPUs, its KV pool following each layer's device.

This machine has one CPU and no GPU, so no test runs a model over two real devices ("meta" holds
no values: a whole forward cannot end there). What runs here: loading through accelerate's
device_map (everything lands on the CPU), the engine serving a model dispatched by accelerate
(its hooks on every block, one layer offloaded to disk), the pool and the engine through the
per-layer device list, the pool's sizing per device (CUDA's free memory stubbed), and the per-device copies of a
step's metadata with "meta" standing in for a second device (shapes only, no values).
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from engine import kv_cache, paged
from engine.engine import Engine, EngineConfig
from engine.kv_cache import KVPool, PoolShape, plan_num_blocks
from engine.loader import ModelLoadError, load_model
from engine.request import GenerationRequest, SamplingParams

PROMPTS = ["The quick brown fox", "Hello there", "Numbers 1 2 3"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
META = torch.device("meta")


def greedy_tokens(loaded, **config) -> list[list[int]]:
    """Every prompt's greedy tokens, the prompts decoded together (prefill packed with decode rows)."""
    engine = Engine(loaded, EngineConfig(max_running=4, prefill_chunk=6, **config)).start()
    try:
        assert engine.packed  # the paged self-test passed on this placement

        async def one(i, text):
            ids = engine.render_prompt([{"role": "user", "content": text}])
            return [t async for ev in engine.generate(GenerationRequest(f"r{i}", ids, GREEDY)) for t in ev.token_ids]

        async def all_of_them():
            return await asyncio.gather(*[one(i, t) for i, t in enumerate(PROMPTS)])

        return asyncio.run(all_of_them())
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def plain_tokens(plain):
    return greedy_tokens(plain)


def test_device_map_auto_loads_through_accelerate_and_gives_the_same_greedy_tokens(tiny_model_dir, plain_tokens):
    mapped = load_model(str(tiny_model_dir), device="cpu", dtype="float32", device_map="auto")
    assert mapped.device == "cpu"  # the input embeddings' device: no GPU here, accelerate keeps it all on the CPU
    assert mapped.layer_devices == ["cpu", "cpu"]
    got = greedy_tokens(mapped)
    assert got == plain_tokens
    assert all(len(t) == GREEDY.max_tokens for t in got)


def test_without_device_map_loading_is_unchanged(plain):
    assert plain.device == "cpu" and plain.layer_devices is None
    assert not hasattr(plain.model, "hf_device_map")


def test_a_device_map_naming_no_module_of_the_model_is_one_clear_error(tiny_model_dir):
    with pytest.raises(ModelLoadError, match=r"device_map: 'model\.layer\.0' is not a module of the model") as exc:
        load_model(str(tiny_model_dir), device="cpu", dtype="float32", device_map={"model.layer.0": "cpu"})
    assert "\n" not in str(exc.value)
    mapped = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    assert load_model(str(tiny_model_dir), device="cpu", dtype="float32", device_map=mapped).layer_devices == [
        "cpu",
        "cpu",
    ]


def test_the_engine_serves_through_an_explicit_per_layer_device_list(plain, plain_tokens):
    listed = dataclasses.replace(plain, layer_devices=["cpu", "cpu"])
    assert greedy_tokens(listed, kv_cache_blocks=40) == plain_tokens
    engine = Engine(listed, EngineConfig(kv_cache_blocks=40))
    assert engine.pool.devices == [torch.device("cpu")] * 2
    assert [k.device for k in engine.pool.keys] == [torch.device("cpu")] * 2
    with pytest.raises(ValueError, match="3 layer devices for 2 layers"):
        KVPool(PoolShape.of(plain.model), 4, 4, ["cpu"] * 3)


def test_a_model_dispatched_by_accelerate_serves_through_its_hooks(tiny_model_dir, plain_tokens, tmp_path):
    """What device_map does on several GPUs, on one CPU: accelerate's hooks on every block, moving
    each block's inputs (the step rides among them) to where it runs; layer 1 offloaded to disk, its
    weights on "meta" between steps, so only its hook says where it runs."""
    from accelerate import dispatch_model

    from engine.loader import layer_devices

    loaded = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    spread = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu"}
    spread.update({"model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"})
    dispatch_model(loaded.model, device_map=spread, offload_dir=str(tmp_path))
    assert next(loaded.model.model.layers[1].parameters()).device == META
    assert layer_devices(loaded.model) == ["cpu", "cpu"]
    assert greedy_tokens(dataclasses.replace(loaded, layer_devices=["cpu", "cpu"])) == plain_tokens


def test_the_pool_puts_each_layer_on_its_own_device():
    shape = PoolShape(num_layers=3, kv_heads=2, head_dim=8, dtype=torch.float32)
    pool = KVPool(shape, num_blocks=5, block_size=4, device=["cpu", META, "cpu"])
    assert [k.device.type for k in pool.keys] == ["cpu", "meta", "cpu"]
    assert [v.device.type for v in pool.values] == ["cpu", "meta", "cpu"]
    assert all(k.shape == (20, 2, 8) for k in pool.keys)


def test_pool_size_is_the_fewest_blocks_any_device_affords(monkeypatch):
    shape = PoolShape(num_layers=4, kv_heads=2, head_dim=64, dtype=torch.float16)
    per_layer_block = 2 * 2 * 64 * 2 * 16  # keys and values, kv heads, head dim, bytes, block size
    free = {0: 10 * 2**30, 1: 4 * 2**30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free[torch.device(d).index], 80 * 2**30))
    plan = dict(max_running=10_000, max_model_len=4096, memory_fraction=0.5)
    # one layer on cuda:0 (10 GiB free), three on cuda:1 (4 GiB free): cuda:1 is the tighter
    n, why = plan_num_blocks(shape, ["cuda:0", "cuda:1", "cuda:1", "cuda:1"], 16, **plan)
    assert n == int(4 * 2**30 * 0.5) // (3 * per_layer_block)
    assert "on cuda:1 (3 of 4 layers)" in why
    # two and two: cuda:1 still, each device's own free memory for its own two layers
    n, _ = plan_num_blocks(shape, ["cuda:0", "cuda:0", "cuda:1", "cuda:1"], 16, **plan)
    assert n == int(4 * 2**30 * 0.5) // (2 * per_layer_block)
    # one device: as before, all four layers out of its free memory
    n, why = plan_num_blocks(shape, "cuda:0", 16, **plan)
    assert n == int(10 * 2**30 * 0.5) // (4 * per_layer_block) and "layers)" not in why
    # off CUDA each device gets the default budget for its own layers
    n, _ = plan_num_blocks(shape, ["cpu", "cpu", META, META], 16, max_running=10_000, max_model_len=4096)
    assert n == int(kv_cache.DEFAULT_CPU_GB * 2**30) // (2 * per_layer_block)


class _Attention(torch.nn.Module):
    """What transformers' SDPA wrapper reads off an attention module."""

    num_key_value_groups = 2
    is_causal = True


def _layer(step: paged.PagedStep, layer: int, device, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, n, 8, generator=g).to(device) for h in (4, 2, 2))
    ref, _ = step.update(k, v, layer)
    return paged.paged_attention(_Attention(), q, ref, ref, None)[0]


def test_step_metadata_is_copied_once_per_other_device():
    shape = PoolShape(num_layers=4, kv_heads=2, head_dim=8, dtype=torch.float32)
    rows = [([1, 2], 6), ([3], 3)]  # two decode rows of different lengths (a padded, masked gather)
    chunks = [([4, 5], 0, 5), ([6], 2, 2)]  # a fresh prompt chunk and a continuation
    n = len(rows) + 5 + 2
    one = KVPool(shape, 8, 4, "cpu")
    spread = KVPool(shape, 8, 4, ["cpu", "cpu", META, META])
    ref_step = paged.PagedStep.build(one, rows, chunks, "cpu")
    step = paged.PagedStep.build(spread, rows, chunks, "cpu")
    # the first device: the step itself, its own tensors
    assert step.on(torch.device("cpu")) is step
    outs = [_layer(step, li, "cpu", n, seed=li) for li in (0, 1)]
    refs = [_layer(ref_step, li, "cpu", n, seed=li) for li in (0, 1)]
    for got, want in zip(outs, refs):
        assert torch.equal(got, want)  # layers on the first device compute as on a one-device pool
    # layers 2 and 3 on the other device: one copy, made when layer 2 asks, reused by layer 3
    copy = step.on(META)
    for li in (2, 3):
        out = _layer(step, li, META, n, seed=li)
        assert out.device == META and out.shape == outs[0].shape
        assert step.on(META) is copy
    assert copy.slot_mapping.device == META and copy.slot_mapping.shape == step.slot_mapping.shape
    assert copy.row_slots.device == META and copy.row_slots.shape == step.row_slots.shape
    assert copy.row_lengths.device == META
    assert [s.context is None for s in copy.segments] == [True, False]
    assert copy.segments[1].context.device == META
    assert (copy.rows, copy.min_len, copy.max_len) == (step.rows, step.min_len, step.max_len)
    assert torch.equal(step.slot_mapping, ref_step.slot_mapping)  # the original is untouched
    # a new step starts with no copies
    assert paged.PagedStep.build(spread, rows, chunks, "cpu").on(META) is not copy
