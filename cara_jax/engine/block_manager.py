"""KV pages for sequences: block tables, reference counts and the prefix cache.

Pages are handed out as a sequence grows (one per ``block_size`` tokens) and given back the
moment it finishes, is aborted or is preempted. Page 0 is never handed out (kv_cache.py).

Prefix caching: once a full block of a sequence is computed, its page is registered under a
hash of (the previous block's hash, the block's token ids, the adapter's content hash or
"base"). A new sequence takes the longest chain of registered pages that starts its prompt and
prefills only the rest. Because the adapter's *content* is in every hash, KV never crosses
adapters, and a name reloaded with new weights starts from no hits. A freed page keeps its
registration while it sits in the free list; pages are taken from the free list in LRU order
(unregistered pages first, then the least recently freed), which is when a cached block is
evicted. Shared pages are read-only: a hit always stops before the prompt's last token, so a
sequence writes only pages of its own.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import numpy as np

BASE_KEY = "base"  # the adapter part of a block hash for base-model sequences


def extend_block_hashes(
    hashes: list[bytes], tokens: list[int], block_size: int, adapter_key: str
) -> list[bytes]:
    """Append the chain hashes of the full blocks of ``tokens`` not hashed yet (in place)."""
    prev = hashes[-1] if hashes else b""
    key = adapter_key.encode()
    for i in range(len(hashes), len(tokens) // block_size):
        block = np.asarray(tokens[i * block_size : (i + 1) * block_size], np.int64)
        prev = hashlib.sha256(prev + b"|" + key + b"|" + block.tobytes()).digest()
        hashes.append(prev)
    return hashes


@dataclasses.dataclass
class PrefixCacheStats:
    """Counted in tokens, as vLLM does: what admissions looked up, and what they found."""

    queries: int = 0
    hits: int = 0
    evictions: int = 0  # cached blocks whose pages were taken for other data
    hits_by_adapter: dict[str | None, int] = dataclasses.field(default_factory=dict)
    queries_by_adapter: dict[str | None, int] = dataclasses.field(default_factory=dict)


class BlockManager:
    def __init__(self, num_pages: int, block_size: int, enable_caching: bool = True) -> None:
        if num_pages < 2:
            raise ValueError("the KV cache needs at least 2 pages (page 0 is reserved)")
        self.num_pages = num_pages
        self.block_size = block_size
        self.enable_caching = enable_caching
        # free pages in eviction order: the first is taken first
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict(
            (p, None) for p in range(1, num_pages)
        )
        self._ref = [0] * num_pages
        self._page_hash: list[bytes | None] = [None] * num_pages
        self._cached: dict[bytes, int] = {}  # block hash -> page holding that block's KV
        self._tables: dict[str, list[int]] = {}
        self._committed: dict[str, int] = {}  # blocks of a sequence registered so far
        self.stats = PrefixCacheStats()

    @property
    def num_free(self) -> int:
        """Pages a sequence could take now (cached blocks nobody uses count: they are evictable)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def capacity_tokens(self) -> int:
        return (self.num_pages - 1) * self.block_size

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def table(self, key: str) -> list[int]:
        return self._tables.get(key, [])

    def fits(self, key: str, tokens: int) -> int:
        """How many of ``tokens`` total positions the sequence could cover now."""
        have = len(self._tables.get(key, ()))
        return min(tokens, (have + len(self._free)) * self.block_size)

    def _take(self) -> int:
        page, _ = self._free.popitem(last=False)
        h = self._page_hash[page]
        if h is not None:  # evict the cached block this free page held
            if self._cached.get(h) == page:
                del self._cached[h]
            self._page_hash[page] = None
            self.stats.evictions += 1
        self._ref[page] = 1
        return page

    def grow(self, key: str, tokens: int) -> bool:
        """Make the sequence's table cover positions [0, tokens); False (and no change) when
        there are not enough free pages."""
        table = self._tables.setdefault(key, [])
        need = self.pages_for(tokens) - len(table)
        if need <= 0:
            return True
        if need > len(self._free):
            if not table:
                del self._tables[key]
            return False
        table.extend(self._take() for _ in range(need))
        return True

    def free(self, key: str) -> None:
        """Drop the sequence's hold on its pages. Pages nobody else holds go to the free list:
        unregistered ones to its front (reused first), registered ones to its back, the
        sequence's last block first (a prefix outlives its continuations)."""
        self._committed.pop(key, None)
        for p in reversed(self._tables.pop(key, ())):
            self._ref[p] -= 1
            if self._ref[p] > 0:
                continue
            self._free[p] = None
            if self._page_hash[p] is None:
                self._free.move_to_end(p, last=False)

    # ------------------------------------------------------------------ prefix cache

    def record(self, adapter: str | None, query_tokens: int, hit_tokens: int) -> None:
        """Count one admission's lookup (in tokens) and what it found."""
        name, s = adapter, self.stats  # None: the base model
        s.queries += query_tokens
        s.hits += hit_tokens
        s.queries_by_adapter[name] = s.queries_by_adapter.get(name, 0) + query_tokens
        s.hits_by_adapter[name] = s.hits_by_adapter.get(name, 0) + hit_tokens

    def forget_adapter(self, adapter: str) -> None:
        """Drop a name's per-adapter counters (its name was unloaded): a server that loads and
        unloads names for months keeps no series of the names it no longer serves."""
        self.stats.queries_by_adapter.pop(adapter, None)
        self.stats.hits_by_adapter.pop(adapter, None)

    def match(self, key: str, hashes: list[bytes]) -> int:
        """Start the sequence ``key`` (no pages yet) on the longest chain of cached blocks among
        ``hashes`` (the caller leaves out blocks that must be computed); returns the number of
        tokens whose KV it now shares."""
        assert key not in self._tables, key
        if not self.enable_caching:
            return 0
        pages: list[int] = []
        for h in hashes:
            p = self._cached.get(h)
            if p is None:
                break
            pages.append(p)
        if not pages:
            return 0
        for p in pages:
            if self._ref[p] == 0:
                del self._free[p]
            self._ref[p] += 1
        self._tables[key] = pages
        self._committed[key] = len(pages)
        return len(pages) * self.block_size

    def cached_prefix(self, hashes: list[bytes]) -> int:
        """Tokens a sequence with these block hashes would find cached now (takes nothing)."""
        n = 0
        for h in hashes:
            if h not in self._cached:
                break
            n += 1
        return n * self.block_size

    def commit(self, key: str, hashes: list[bytes], full_blocks: int) -> None:
        """Register the sequence's first ``full_blocks`` blocks (computed, tokens known) so that
        later sequences can share them."""
        if not self.enable_caching:
            return
        table = self._tables.get(key)
        if table is None:
            return
        done = self._committed.get(key, 0)
        n = min(full_blocks, len(table), len(hashes))
        for i in range(done, n):
            h, p = hashes[i], table[i]
            if h not in self._cached and self._page_hash[p] is None:
                self._cached[h] = p
                self._page_hash[p] = h
            # else: another sequence computed the same block at the same time; this page stays
            # private and is recycled when the sequence ends
        if n > done:
            self._committed[key] = n

    def reset_cache(self) -> int:
        """Forget every cached block that no running sequence holds; returns how many."""
        n = 0
        for p in list(self._free):
            h = self._page_hash[p]
            if h is not None:
                self._cached.pop(h, None)
                self._page_hash[p] = None
                self._free.move_to_end(p, last=False)
                n += 1
        return n
