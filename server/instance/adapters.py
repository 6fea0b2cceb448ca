"""Adapter names as the HTTP API sees them: startup and runtime loads, lazy loads by name.

Loads read and validate files (and, in ``cached`` mode, wait for the device copy), so they run in
a worker thread, never on the event loop. Loads of one name are serialized; a request naming an
adapter under ``--lora-dir`` that is not registered yet loads it once, however many requests ask
for it at the same moment.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

from cara_jax.adapters.mixture import LoraRef, MixtureError, parse_mixture
from cara_jax.adapters.peft import AdapterError
from cara_jax.adapters.store import RegisteredAdapter, UnknownAdapterError
from server.protocol import ApiError, not_found_model

if TYPE_CHECKING:
    from server.instance.state import AppState

log = logging.getLogger(__name__)
MAX_NAME = 256


class AdapterManager:
    def __init__(self, state: AppState) -> None:
        self.state = state
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    def is_base(self, name: str | None) -> bool:
        return name is None or name in self.state.config.served_names

    def registered(self) -> dict[str, RegisteredAdapter]:
        return self.state.engine.adapters()

    def check_name(self, name: object, param: str = "lora_name") -> str:
        if not isinstance(name, str) or not name:
            raise ApiError(
                400, f"`{param}` must be a non-empty string", param=param, code="invalid_value"
            )
        if len(name) > MAX_NAME or "," in name or not name.isprintable() or name != name.strip():
            raise ApiError(
                400,
                f"`{param}`: adapter names are printable, at most {MAX_NAME} "
                "characters, without commas or surrounding spaces",
                param=param,
                code="invalid_value",
            )
        if self.is_base(name):
            raise ApiError(
                400,
                f"`{param}` {name!r} is the base model's name",
                param=param,
                code="invalid_value",
            )
        return name

    async def resolve_model(self, name: str | None) -> str | None:
        """The adapter a request's ``model`` names (None: the base model); 404 if none."""
        if self.is_base(name):
            return None
        if name in self.registered():
            return name
        lora_dir = self.state.lora_dir
        if lora_dir is None:
            raise not_found_model(name)
        self.check_name(name, "model")
        async with self._lock(name):
            if name in self.registered():
                return name  # another request loaded it meanwhile
            path = lora_dir.resolve(name)
            await self._load(name, path)
        return name

    async def resolve_lora(self, raw, adapter: str | None) -> tuple[LoraRef, ...] | None:
        """A request's ``lora`` list (adapters at weights, llama.cpp's shape by name), each
        name resolved as ``model`` is (loaded from the adapter folder on first use); None
        when the request has none. 400 for a malformed list, a list beside an adapter
        ``model``, or the base model's name in it; 404 for an unknown name."""
        if raw is None:
            return None
        if adapter is not None:
            raise ApiError(400, "`lora` composes adapters over the base model: set `model` to "
                           "the base model's name (or name one adapter in `model` alone)",
                           param="lora", code="invalid_value")  # fmt: skip
        try:
            refs = parse_mixture(raw, self.state.engine.config.max_lora_entries)
        except MixtureError as e:
            raise ApiError(400, f"`lora` {e}", param="lora", code="invalid_value") from None
        for r in refs:
            if self.is_base(r.name):
                raise ApiError(400, f"`lora` names the base model {r.name!r}; list adapters "
                               "only", param="lora", code="invalid_value")  # fmt: skip
            try:
                await self.resolve_model(r.name)
            except ApiError as e:
                e.param = "lora"
                raise
        return refs

    async def load(self, name: str, path: Path) -> RegisteredAdapter:
        """Register ``name`` (replacing what it pointed at if the contents differ)."""
        self.check_name(name)
        async with self._lock(name):
            return await self._load(name, path)

    async def _load(self, name: str, path: Path) -> RegisteredAdapter:
        engine = self.state.engine

        def work() -> tuple[RegisteredAdapter, float, list[str]]:
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                entry = engine.load_adapter(name, path)
            return entry, time.perf_counter() - t0, [str(w.message) for w in caught]

        try:
            entry, seconds, notes = await asyncio.to_thread(work)
        except AdapterError as e:
            raise ApiError(
                400, f"cannot load adapter {name!r}: {e}", param="lora_path", code="invalid_adapter"
            ) from e
        except (OSError, ValueError) as e:
            raise ApiError(
                400,
                f"cannot load adapter {name!r} from {str(path)!r}: {e}",
                param="lora_path",
                code="invalid_adapter",
            ) from e
        for note in notes:
            log.warning("adapter %s: %s", name, note)
        self.state.metrics.lora_load.labels(name).observe(seconds)
        log.info(
            "adapter %s loaded from %s in %.3fs (rank %d, content %s)",
            name,
            path,
            seconds,
            entry.max_rank,
            entry.content_hash[:12],
        )
        return entry

    async def unload(self, name: str) -> RegisteredAdapter:
        self.check_name(name)
        async with self._lock(name):
            entry = self.registered().get(name)
            try:
                await asyncio.to_thread(self.state.engine.unload_adapter, name)
            except UnknownAdapterError as e:
                raise ApiError(
                    404,
                    f"adapter {name!r} is not loaded",
                    param="lora_name",
                    code="model_not_found",
                ) from e
        try:
            self.state.metrics.lora_load.remove(name)  # per-adapter series live while loaded
        except KeyError:
            pass
        return entry
