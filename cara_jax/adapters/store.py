"""Host tier and name registry: adapters keyed by content, names pointing at contents.

- ``HostStore``: LRU by bytes of parsed adapters (numpy) keyed by content hash; identical
  contents loaded under several names are stored once.
- ``AdapterRegistry``: name -> (path, content hash). Registering a name again with different
  contents swaps the mapping atomically; sequences that already hold the old content keep it
  (the device pool refcounts by content hash), new requests get the new one. An adapter evicted
  from the host tier is re-read from disk on the next use; one registered from memory (weights
  given as a tree, no folder) is kept by the registry for as long as a name points at it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from cara_jax.adapters.peft import AdapterError, LoraAdapter, load_peft_adapter
from cara_jax.config import ModelConfig

log = logging.getLogger(__name__)


class UnknownAdapterError(KeyError):
    """No adapter is registered under this name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown adapter"


class HostStore:
    """Parsed adapters in host memory, LRU-evicted beyond ``budget_bytes``."""

    def __init__(self, budget_bytes: int = 4 << 30) -> None:
        self.budget_bytes = budget_bytes
        self._items: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._items.values())

    def get(self, content_hash: str) -> LoraAdapter | None:
        with self._lock:
            a = self._items.get(content_hash)
            if a is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(content_hash)
            return a

    def put(self, adapter: LoraAdapter) -> LoraAdapter:
        """Insert (or return the already stored object with the same content)."""
        with self._lock:
            have = self._items.get(adapter.content_hash)
            if have is not None:
                self._items.move_to_end(adapter.content_hash)
                return have
            self._items[adapter.content_hash] = adapter
            while self.nbytes > self.budget_bytes and len(self._items) > 1:
                self._items.popitem(last=False)
                self.evictions += 1
            return adapter

    def __contains__(self, content_hash: str) -> bool:
        return content_hash in self._items


@dataclasses.dataclass(frozen=True)
class RegisteredAdapter:
    name: str
    path: str
    content_hash: str
    max_rank: int
    cost_rank: int  # what scheduling counts (LoraAdapter.cost_rank)
    dora: bool = False  # a DoRA adapter (adapters/dora.py)


class AdapterRegistry:
    """Adapter names for one base model, resolved through the host store."""

    def __init__(
        self, cfg: ModelConfig, host: HostStore | None = None, base_model_name: str | None = None
    ):
        self.cfg = cfg
        self.host = host or HostStore()
        self.base_model_name = base_model_name
        self._names: dict[str, RegisteredAdapter] = {}
        self._memory: dict[str, LoraAdapter] = {}  # content -> adapter with no folder behind it
        self._lock = threading.Lock()

    def register(
        self,
        name: str,
        source: str | Path | LoraAdapter,
        check: Callable[[LoraAdapter], object] | None = None,
    ) -> RegisteredAdapter:
        """Load and validate ``source``, a PEFT folder or an adapter already in memory (all or
        nothing; ``check`` may raise too, e.g. the device pool converting it to its layout),
        then point ``name`` at its content."""
        if isinstance(source, LoraAdapter):
            adapter, path = source, ""
        else:
            adapter = load_peft_adapter(source, self.cfg, base_model_name=self.base_model_name)
            path = str(source)
        if check is not None:
            check(adapter)
        adapter = self.host.put(adapter)
        entry = RegisteredAdapter(
            name, path, adapter.content_hash, adapter.max_rank,
            adapter.cost_rank(self.cfg.num_layers), adapter.dora,
        )  # fmt: skip
        with self._lock:
            old = self._names.get(name)
            self._names[name] = entry
            if not path:
                self._memory[adapter.content_hash] = adapter
            self._forget_unused()
        if old is not None and old.content_hash != entry.content_hash:
            log.info(
                "adapter %s replaced: %s -> %s",
                name,
                old.content_hash[:12],
                entry.content_hash[:12],
            )
        return entry

    def unregister(self, name: str) -> RegisteredAdapter:
        with self._lock:
            if name not in self._names:
                raise UnknownAdapterError(f"adapter {name!r} is not loaded")
            entry = self._names.pop(name)
            self._forget_unused()
            return entry

    def _forget_unused(self) -> None:
        """Drop in-memory adapters no name points at (under the lock)."""
        held = {e.content_hash for e in self._names.values()}
        for h in [h for h in self._memory if h not in held]:
            del self._memory[h]

    def names(self) -> dict[str, RegisteredAdapter]:
        with self._lock:
            return dict(self._names)

    def entry(self, name: str) -> RegisteredAdapter:
        with self._lock:
            e = self._names.get(name)
        if e is None:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        return e

    def resolve(self, name: str) -> LoraAdapter:
        """The adapter's current content, re-read from disk if the host tier evicted it."""
        e = self.entry(name)
        a = self.host.get(e.content_hash)
        if a is not None:
            return a
        with self._lock:
            a = self._memory.get(e.content_hash)
        if a is not None:
            return self.host.put(a)
        if not e.path:  # from memory, and replaced or unloaded since this entry was read
            raise AdapterError(f"adapter {name!r} was replaced while it was being resolved")
        a = load_peft_adapter(e.path, self.cfg, base_model_name=self.base_model_name)
        if a.content_hash != e.content_hash:
            raise AdapterError(
                f"adapter {name!r} changed on disk since it was loaded; load it again to use "
                "the new contents"
            )
        return self.host.put(a)
