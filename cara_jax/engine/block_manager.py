"""KV pages for sequences: a free list and a block table per sequence.

Pages are handed out as a sequence grows (one per ``block_size`` tokens) and returned the
moment it finishes, is aborted or is preempted. Page 0 is never handed out (kv_cache.py).
"""

from __future__ import annotations

import collections


class BlockManager:
    def __init__(self, num_pages: int, block_size: int) -> None:
        if num_pages < 2:
            raise ValueError("the KV cache needs at least 2 pages (page 0 is reserved)")
        self.num_pages = num_pages
        self.block_size = block_size
        self._free: collections.deque[int] = collections.deque(range(1, num_pages))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

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
        table.extend(self._free.popleft() for _ in range(need))
        return True

    def free(self, key: str) -> None:
        for p in self._tables.pop(key, ()):
            self._free.append(p)
