"""Prefix caching: the keys and values of prompt prefixes already computed, keyed by adapter version.

SaaS traffic repeats long prefixes (a system prompt per task, few-shot
examples, a conversation's history). A new sequence whose tokens start with
a cached prefix copies that prefix's keys and values into its own KV row
and computes only the rest; a copy costs a memcpy where recomputing costs
the whole model.

Keys. The cache is a trie of *blocks* of `block` tokens under one root per
adapter version (`name@version`, or None for the base model). A node is
reached by the exact tokens of every block before it, so a hit means the
same adapter version saw exactly these tokens at exactly these positions.
Store versions are immutable and their numbers are never reused (the
store's counters), so a new version can never attend to keys and values an
older version computed: it has another root. Base-model requests share the
`None` root with each other. (An engine whose weights change in place under
one name -- the trainer's rollout engine -- runs without a prefix cache.)

Memory comes out of the KV budget (`--kv-cache-tokens`). Cached blocks only
use memory no running sequence holds: when a sequence needs room, the
least recently used blocks go first, before anyone is preempted, and the
cache never takes memory from a running sequence. LRU order keeps every
node more recent than its descendants (a lookup touches a chain from leaf to
root), so the oldest node is always a leaf and evicting it never strands a
subtree.

What is cached: after every step, each sequence's newly completed full
blocks (prompt and generated tokens alike: keys and values depend only on
the tokens, their positions and the adapter). A lookup reuses whole blocks
only, and always leaves the last token to compute (its logits are needed),
so a prefix ending inside a block reuses the blocks before it. Requests that
ask for prompt logprobs compute their whole prompt (those rows' logits are
the answer).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

DEFAULT_BLOCK = 16


class _Node:
    __slots__ = ("tokens", "parent", "children", "kv", "ref")

    def __init__(self, ref, tokens: tuple, parent: "_Node | None", kv: torch.Tensor):
        self.ref = ref
        self.tokens = tokens
        self.parent = parent
        self.children: dict[tuple, _Node] = {}
        self.kv = kv  # [L, 2, nKV, block, D]

    @property
    def evicted(self) -> bool:
        return self.kv is None


class PrefixCache:
    def __init__(self, *, block: int = DEFAULT_BLOCK, room):
        """`room(tokens)` -> bool: makes `tokens` of budget free for the cache without touching running sequences'
        memory (the KV manager evicts this cache's own LRU blocks for it) and says whether it could."""
        self.block = block
        self._room = room
        self.roots: dict[str | None, dict[tuple, _Node]] = {}
        self._lru: OrderedDict[_Node, None] = OrderedDict()  # oldest first
        self.protected: set[_Node] = set()  # a chain being loaded: never evicted under it
        self.evictions = 0

    @property
    def tokens(self) -> int:
        return len(self._lru) * self.block

    def __len__(self) -> int:
        return len(self._lru)

    def match(self, ref: str | None, ids: list[int], limit: int) -> list[_Node]:
        """The longest chain of cached blocks that `ids` starts with, at most `limit` tokens; touched as used."""
        B = self.block
        chain: list[_Node] = []
        level = self.roots.get(ref)
        for j in range(min(limit, len(ids)) // B):
            if not level:
                break
            node = level.get(tuple(ids[j * B : (j + 1) * B]))
            if node is None:
                break
            chain.append(node)
            level = node.children
        self._touch(chain)
        return chain

    def load(self, chain: list[_Node], cache) -> int:
        """Copies the chain's keys and values into positions 0.. of `cache` (reserved for them); -> tokens."""
        B = self.block
        for j, node in enumerate(chain):
            cache.kv[:, :, :, j * B : (j + 1) * B] = node.kv
        n = len(chain) * B
        cache.length = max(cache.length, n)
        return n

    def extend(self, ref: str | None, ids: list[int], computed: int, cache,
               chain: list[_Node] | None) -> list[_Node] | None:
        """Adds the full blocks of `ids[:computed]` (their keys and values are in `cache`) past `chain`.

        Returns the extended chain, or None once the chain cannot grow (its tail
        was evicted, or there is no room): that sequence then adds nothing more.
        """
        if chain is None or (chain and chain[-1].evicted):
            return None
        B = self.block
        full = computed // B
        if full <= len(chain):
            return chain
        self.protected = set(chain)
        try:
            for j in range(len(chain), full):
                tokens = tuple(ids[j * B : (j + 1) * B])
                level = chain[-1].children if chain else self.roots.setdefault(ref, {})
                node = level.get(tokens)
                if node is None:
                    if not self._room(B):
                        self._touch(chain)
                        return None
                    level = chain[-1].children if chain else self.roots.setdefault(ref, {})  # eviction may drop a root
                    node = _Node(ref, tokens, chain[-1] if chain else None,
                                 cache.kv[:, :, :, j * B : (j + 1) * B].clone())
                    level[tokens] = node
                    self._lru[node] = None
                chain.append(node)
                self.protected.add(node)
        finally:
            self.protected = set()
        self._touch(chain)
        return chain

    def evict_one(self) -> bool:
        """Drops the least recently used block that is a leaf and not protected; False if there is none."""
        for node in self._lru:
            if not node.children and node not in self.protected:
                self._drop(node)
                return True
        return False

    def _drop(self, node: _Node) -> None:
        level = node.parent.children if node.parent is not None else self.roots.get(node.ref, {})
        level.pop(node.tokens, None)
        if node.parent is None and not level:
            self.roots.pop(node.ref, None)
        del self._lru[node]
        node.kv = None
        self.evictions += 1

    def _touch(self, chain: list[_Node]) -> None:
        for node in reversed(chain):  # leaf first: every node ends more recent than its descendants
            self._lru.move_to_end(node)
