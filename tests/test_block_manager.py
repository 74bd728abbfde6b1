"""BlockManager: allocation, freeing, reference counts, prefix reuse and its LRU eviction."""

from __future__ import annotations

from engine.block_manager import NULL_BLOCK, BlockManager


def filled(bm: BlockManager, ids: list[int]) -> list[int]:
    """Allocate for ``ids`` and register its KV as written (as the engine does after a forward)."""
    table, _ = bm.allocate(ids)
    bm.register(ids, table, len(ids), 0, None)
    return table


def test_allocation_and_free_account_for_every_block():
    bm = BlockManager(num_blocks=9, block_size=4, prefix_caching=False)
    assert bm.num_free == 8 and bm.capacity_tokens == 32  # block 0 is reserved
    table, cached = bm.allocate(list(range(10)))  # 10 tokens -> 3 blocks
    assert len(table) == 3 and cached == 0 and NULL_BLOCK not in table
    assert bm.num_free == 5 and bm.num_used == 3
    assert bm.can_allocate(20) and not bm.can_allocate(21)
    bm.free_table(table)
    assert table == [] and bm.num_free == 8


def test_append_slot_takes_a_block_only_at_a_block_boundary_and_fails_when_none_is_free():
    bm = BlockManager(num_blocks=3, block_size=4, prefix_caching=False)
    table, _ = bm.allocate([1, 2, 3])
    assert bm.append_slot(table, 3) and len(table) == 1  # position 3 fits in block 0 of the table
    assert bm.append_slot(table, 4) and len(table) == 2  # position 4 needs a new block
    assert bm.num_free == 0
    assert not bm.append_slot(table, 8) and len(table) == 2  # none left


def test_shared_prefix_blocks_are_reference_counted():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    ta = filled(bm, a)
    b = a[:8] + [50, 51, 52]
    tb, cached = bm.allocate(b)
    assert cached == 8 and tb[:2] == ta[:2] and tb[2] != ta[2]
    assert [bm.blocks[i].ref_count for i in ta[:2]] == [2, 2]
    used = bm.num_used
    bm.free_table(ta)
    assert bm.num_used == used - 1  # only a's own last block came back
    assert [bm.blocks[i].ref_count for i in tb[:2]] == [1, 1]


def test_prefix_reuse_needs_written_kv_and_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    ta, _ = bm.allocate(a)
    assert bm.allocate(a + [9])[1] == 0  # not registered yet: nothing shared
    bm.register(a, ta, 8, 0, None)
    assert bm.allocate(a + [9])[1] == 8
    assert bm.allocate(a)[1] == 4  # the same 8 tokens: the last block is recomputed
    other_start = [9, 2, 3, 4, 5, 6, 7, 8, 1]
    assert bm.allocate(other_start)[1] == 0  # block 2 matches, but its prefix does not


def test_freed_blocks_stay_reusable_until_allocation_takes_them_oldest_first():
    bm = BlockManager(num_blocks=5, block_size=2)  # 4 usable blocks
    old = [1, 1, 2, 2]
    new = [3, 3, 4, 4]
    bm.free_table(filled(bm, old))
    bm.free_table(filled(bm, new))  # both freed, 'old' first
    assert bm.num_free == 4
    bm.free_table(bm.allocate([7, 7, 8])[0])  # 2 fresh blocks: the least recently freed
    t, cached = bm.allocate(new + [9])
    assert cached == 4  # 'new' survived, freed but still cached
    bm.free_table(t)
    assert bm.allocate(old + [9])[1] == 0  # 'old' was overwritten


def test_blocks_filled_while_decoding_are_registered_too():
    bm = BlockManager(num_blocks=8, block_size=4)
    ids = [5, 6, 7]
    table, _ = bm.allocate(ids)
    n_reg, prev = bm.register(ids, table, 3, 0, None)
    assert n_reg == 0
    for tok in [8, 9, 10]:  # decode: the first block fills, then more
        ids.append(tok)
        assert bm.append_slot(table, len(ids) - 1)
        n_reg, prev = bm.register(ids, table, len(ids), n_reg, prev)
    assert n_reg == 1
    assert bm.allocate([5, 6, 7, 8, 1])[1] == 4


def test_extra_keys_keep_equal_tokens_apart_from_where_they_start():
    bm = BlockManager(num_blocks=16, block_size=2)
    ids = [1, 2, 3, 4, 5]  # the "image" starts at token 2
    table, _ = bm.allocate(ids, extra=(2, "image-a"))
    bm.register(ids, table, 5, 0, None, extra=(2, "image-a"))
    assert bm.allocate(ids, extra=(2, "image-a"))[1] == 4
    assert bm.allocate(ids, extra=(2, "image-b"))[1] == 2  # the block before the image is shared
    assert bm.allocate(ids)[1] == 2
