"""Prefix caching: prompt KV kept after prefill, reused by later prompts that start the same way.

LAN clients mostly share a system prompt (and chat clients resend the whole conversation each
turn), so a new prompt often begins with tokens whose keys and values were computed moments ago.
Prompts are cut into blocks of ``block`` tokens; a trie keyed by each block's token ids holds
every distinct block's KV once (shared prefixes are stored once, however many prompts share them).
A newcomer walks the trie over its full blocks, starts its own cache from the blocks it found, and
prefills only the rest. Keys and values of a token depend only on the tokens before it, so the
reused KV is what a fresh prefill would compute (up to float rounding of a different chunking).

Memory is bounded by ``max_blocks``; the least recently used leaves go first.
"""
from __future__ import annotations

import heapq
import itertools

import torch
from transformers import DynamicCache


class _Node:
    __slots__ = ("keys", "values", "children", "parent", "token_key", "used")

    def __init__(self, keys, values, parent, token_key):
        self.keys = keys          # per layer [1, H, block, D]
        self.values = values
        self.children: dict[tuple, _Node] = {}
        self.parent = parent
        self.token_key = token_key
        self.used = 0


class PrefixCache:
    def __init__(self, max_blocks: int, block: int = 16):
        self.block = block
        self.max_blocks = max_blocks
        self.root = _Node(None, None, None, None)
        self.blocks = 0
        self._clock = itertools.count(1)
        self.lookups = self.hits = self.hit_tokens = 0

    def _full_blocks(self, ids: list[int], limit: int):
        for start in range(0, limit - limit % self.block, self.block):
            yield tuple(ids[start:start + self.block])

    def start(self, ids: list[int], config) -> tuple[DynamicCache, int]:
        """A fresh cache for ``ids`` holding its longest cached prefix, and that prefix's length.

        At least one prompt token is always left to prefill (its logits give the first token).
        """
        self.lookups += 1
        cache = DynamicCache(config=config)
        node, path = self.root, []
        for key in self._full_blocks(ids, len(ids) - 1):
            node = node.children.get(key)
            if node is None:
                break
            path.append(node)
        if not path:
            return cache, 0
        now = next(self._clock)
        for n in path:
            n.used = now
        for li in range(len(path[0].keys)):
            keys = torch.cat([n.keys[li] for n in path], dim=-2)
            values = torch.cat([n.values[li] for n in path], dim=-2)
            cache.update(keys, values, li)
        past = len(path) * self.block
        self.hits += 1
        self.hit_tokens += past
        return cache, past

    def insert(self, ids: list[int], cache: DynamicCache) -> None:
        """Keep the full blocks of a freshly prefilled prompt (``cache`` holds exactly its KV)."""
        blocks = list(self._full_blocks(ids, len(ids)))
        node, path = self.root, []
        for key in blocks:   # the part already stored
            child = node.children.get(key)
            if child is None:
                break
            node = child
            path.append(node)
        new = len(blocks) - len(path)
        if new > self.max_blocks - self.blocks:
            self._evict(new - (self.max_blocks - self.blocks) + self.max_blocks // 10, protect=path)
        now = next(self._clock)
        for b in range(len(path), len(blocks)):
            if self.blocks >= self.max_blocks:
                break
            s = slice(b * self.block, (b + 1) * self.block)
            child = _Node([layer.keys[:, :, s].clone() for layer in cache.layers],
                          [layer.values[:, :, s].clone() for layer in cache.layers], node, blocks[b])
            node.children[blocks[b]] = child
            self.blocks += 1
            path.append(child)
            node = child
        for n in path:
            n.used = now

    def _evict(self, need: int, protect: list[_Node]) -> None:
        """Drop ``need`` blocks, least recently used leaves first (never those in ``protect``)."""
        keep = {id(n) for n in protect}
        heap, stack, tie = [], [self.root], itertools.count()
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            if not n.children and n is not self.root and id(n) not in keep:
                heap.append((n.used, next(tie), n))
        heapq.heapify(heap)
        while need > 0 and heap:
            _, _, n = heapq.heappop(heap)
            parent = n.parent
            del parent.children[n.token_key]
            self.blocks -= 1
            need -= 1
            if not parent.children and parent is not self.root and id(parent) not in keep:
                heapq.heappush(heap, (parent.used, next(tie), parent))   # now a leaf itself

    @property
    def stats(self) -> dict:
        return {"prefix_cache_blocks": self.blocks, "prefix_cache_hits": self.hits,
                "prefix_cache_hit_tokens": self.hit_tokens}
