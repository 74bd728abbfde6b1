"""Which KV-pool blocks each sequence holds: allocation, freeing, reference counts, prefix reuse.

The KV pool (engine/kv_cache.py) is cut into blocks of ``block_size`` token slots; a sequence holds
a block table (a list of block ids), and token ``p`` of it lives in slot
``table[p // block_size] * block_size + p % block_size``. This module is the only code that decides
which blocks a sequence holds (nano-vllm's ``BlockManager`` is the model).

Prefix caching lives here too: a full block whose keys and values have been computed is registered
under a hash of its tokens chained with the hash of every block before it (so equal hashes mean
equal prefixes; the tokens are compared as well, so a hash collision cannot share KV). A later
sequence whose prompt starts with the same full blocks takes them, shared, with a reference count,
and prefills only the rest. A block whose count drops to zero goes to the back of the free list but
keeps its hash: it is reused by a matching prompt until allocation takes it for new tokens, oldest
freed first (an LRU cache that costs no memory beyond the pool). Blocks are registered only after
their KV was written, so a sequence never shares a block that is still being prefilled.

``extra = (from_token, key)`` mixes ``key`` into the hash of every block that reaches past token
``from_token`` (e.g. a hash of a prompt's images, from its first image token on), so equal token ids
with different images never share KV, while the text before the first image still does.
"""

from __future__ import annotations

from collections import OrderedDict

NULL_BLOCK = 0  # block 0 is never handed out: padding in gathers points at its (zero) slots


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


def chain_hash(prev: int | None, token_ids: tuple[int, ...], key=None) -> int:
    return hash((prev, token_ids, key))


def _key(extra: tuple[int, object] | None, block_end: int):
    return extra[1] if extra is not None and block_end > extra[0] else None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least 2 blocks (block 0 is reserved)")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # free blocks, least recently freed first; those with a hash still hold a reusable prefix
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.by_hash: dict[int, int] = {}
        self.hit_tokens = 0
        self.lookups = 0

    # ------------------------------------------------------------------ capacity
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - len(self.free)

    @property
    def capacity_tokens(self) -> int:
        """Tokens one sequence could hold if it had the whole pool."""
        return (self.num_blocks - 1) * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self.free)

    # ------------------------------------------------------------------ allocation
    def allocate(
        self, token_ids: list[int], extra: tuple[int, object] | None = None, reuse: bool = True
    ) -> tuple[list[int], int]:
        """Blocks for a sequence about to be prefilled: (block table, tokens whose KV is already there).

        Full blocks found in the prefix cache are shared; at least one token is always left to
        compute (its logits give the next token). ``reuse=False`` takes no cached block (a request
        that wants every prompt position's logits). The caller checked ``can_allocate``.
        """
        bs = self.block_size
        table: list[int] = []
        prev = None
        cached = 0
        if self.prefix_caching and reuse:
            self.lookups += 1
            for start in range(0, (len(token_ids) - 1) // bs * bs, bs):
                key = tuple(token_ids[start : start + bs])
                h = chain_hash(prev, key, _key(extra, start + bs))
                bid = self.by_hash.get(h)
                if bid is None or self.blocks[bid].token_ids != key:
                    break
                self._take(bid)
                table.append(bid)
                prev = h
                cached += bs
            self.hit_tokens += cached
        for _ in range(self.blocks_for(len(token_ids)) - len(table)):
            table.append(self._take_free())
        return table, cached

    def append_slot(self, table: list[int], position: int) -> bool:
        """Make room for the token at ``position``; False if that needs a block and none is free."""
        if position < len(table) * self.block_size:
            return True
        if not self.free:
            return False
        table.append(self._take_free())
        return True

    def free_table(self, table: list[int]) -> None:
        """Release a sequence's blocks (last block first, so a prefix outlives its tails)."""
        for bid in reversed(table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[bid] = None
        table.clear()

    def register(
        self,
        token_ids: list[int],
        table: list[int],
        num_computed: int,
        num_registered: int,
        prev_hash: int | None,
        extra: tuple[int, object] | None = None,
    ) -> tuple[int, int | None]:
        """Register the full blocks among the first ``num_computed`` tokens (their KV is written)
        that are not registered yet; returns the new (num_registered, prev_hash) to keep on the
        sequence."""
        if not self.prefix_caching:
            return num_registered, prev_hash
        bs = self.block_size
        while (num_registered + 1) * bs <= num_computed:
            key = tuple(token_ids[num_registered * bs : (num_registered + 1) * bs])
            h = chain_hash(prev_hash, key, _key(extra, (num_registered + 1) * bs))
            block = self.blocks[table[num_registered]]
            if block.hash is None:
                block.hash, block.token_ids = h, key
                self.by_hash.setdefault(h, block.block_id)
            prev_hash = h
            num_registered += 1
        return num_registered, prev_hash

    # ------------------------------------------------------------------ internals
    def _take(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:
            del self.free[bid]
        block.ref_count += 1

    def _take_free(self) -> int:
        bid, _ = self.free.popitem(last=False)
        block = self.blocks[bid]
        if block.hash is not None:  # its old prefix is overwritten now
            if self.by_hash.get(block.hash) == bid:
                del self.by_hash[block.hash]
            block.hash = block.token_ids = None
        block.ref_count = 1
        return bid

    def stats(self) -> dict:
        return {
            "kv_blocks_total": self.num_blocks - 1,
            "kv_blocks_used": self.num_used,
            "kv_blocks_free": self.num_free,
            "kv_block_size": self.block_size,
            "prefix_cache_blocks": len(self.by_hash),
        }
