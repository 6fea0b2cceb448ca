"""Adapters in the device pool's layout: converted once, kept on disk, memory-mapped.

A cold load should cost its copy and nothing else. So an adapter is converted to the pool's
layout and dtype once (``PackedStore.get``, at registration) and the result is written to disk
under its content hash, by a writer thread (the request that registered it does not wait for
the file: until it lands the copy is served from memory). Later loads, in this process or the next, map that file: no safetensors
parse, no transposes, no padding. Each layer group is one contiguous slice of it, so a group's
load is one host-to-device transfer and one write program (pool_write.py).

Layout, per layer group g (layers n_g), for each pool projection p in order: A^T as
[n_g, w, in_p], then B (scaling folded in) as [n_g, w, out_p]; w is the adapter's write width
(its largest rank rounded up to a power of two, at least 8). Rows beyond a projection's rank,
and projections the adapter does not target, are zeros.

File: an 8-byte magic, an 8-byte header length, a JSON header (content hash, layout key,
width, ranks, group offsets, a BLAKE2 digest of the payload), the payload at a 64-byte
boundary. A file that is truncated, of another layout, or whose digest does not match is never
served: it is rebuilt from the adapter. If the disk is full or read-only the converted copy stays
in memory and the adapter is served from its folder as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cara_jax.adapters.peft import LoraAdapter

log = logging.getLogger(__name__)

MAGIC = b"CARAPAK1"
FORMAT = 1
_ALIGN = 64


def default_cache_dir() -> Path:
    """Where packed copies live: $CARA_JAX_CACHE/adapters (default ~/.cache/cara_jax)."""
    root = os.environ.get("CARA_JAX_CACHE") or Path.home() / ".cache" / "cara_jax"
    return Path(root).expanduser() / "adapters"


def write_width(rank: int) -> int:
    """Rows per projection a load writes: the rank rounded up to a power of two (at least 8)."""
    w = 8
    while w < rank:
        w *= 2
    return w


@dataclasses.dataclass(frozen=True)
class PoolLayout:
    """What a packed copy depends on: the pool's projections and shapes, groups and dtype."""

    projections: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]  # (in, out) per projection
    groups: tuple[tuple[int, int], ...]  # (first layer, layer count) per group
    dtype: str

    @property
    def key(self) -> str:
        text = json.dumps([FORMAT, self.projections, self.shapes, self.groups, self.dtype])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def group_elems(self, g: int, width: int) -> int:
        n = self.groups[g][1]
        return sum(n * width * (din + dout) for din, dout in self.shapes)


@dataclasses.dataclass
class PackedAdapter:
    """One adapter in a pool's layout; ``groups[g]`` is the flat payload of layer group g."""

    content_hash: str
    width: int
    ranks: dict[str, int]  # rank rows per projection (0: not targeted)
    groups: list[np.ndarray]
    source: str  # "disk" (memory-mapped file) or "memory" (converted, not on disk)

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)

    @property
    def nbytes(self) -> int:
        """Bytes a load copies to the device."""
        return sum(int(g.nbytes) for g in self.groups)


def pack(adapter: LoraAdapter, layout: PoolLayout) -> PackedAdapter:
    """Convert a parsed adapter to the pool's layout (the one-time conversion)."""
    ranks: dict[str, int] = {}
    for (_, p), m in adapter.modules.items():
        if p not in layout.projections:
            raise ValueError(f"this pool does not hold projection {p}")
        ranks[p] = max(ranks.get(p, 0), m.rank)
    width = write_width(max(ranks.values(), default=1))
    dtype = np.dtype(layout.dtype) if layout.dtype != "bfloat16" else _bf16()
    groups = []
    for g, (first, n) in enumerate(layout.groups):
        flat = np.zeros(layout.group_elems(g, width), dtype)
        off = 0
        for p, (din, dout) in zip(layout.projections, layout.shapes, strict=True):
            a = flat[off : off + n * width * din].reshape(n, width, din)
            off += n * width * din
            b = flat[off : off + n * width * dout].reshape(n, width, dout)
            off += n * width * dout
            for k in range(n):
                m = adapter.modules.get((first + k, p))
                if m is not None:
                    a[k, : m.rank] = m.a.T
                    b[k, : m.rank] = m.b
        groups.append(flat)
    return PackedAdapter(adapter.content_hash, width, ranks, groups, "memory")


def _bf16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


class PackedStore:
    """Packed copies by content hash: in memory (mapped files cost no RAM of their own), on disk
    under ``folder`` (None: memory only)."""

    def __init__(self, layout: PoolLayout, folder: str | Path | None, budget_bytes: int) -> None:
        self.layout = layout
        self.folder = Path(folder) if folder is not None else None
        self.budget_bytes = budget_bytes  # for copies held in memory (not mapped)
        self._items: OrderedDict[str, PackedAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self.rebuilt = 0  # damaged or stale files replaced
        self.write_errors = 0  # conversions that could not be written (disk full, read-only)
        self.disk_hits = 0
        # copies are written to disk off the request's path: the first request on an adapter
        # pays for the conversion only, not for writing and checking its file
        self._pending: list[Future] = []
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="packed-write")

    def path(self, content_hash: str) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / f"{content_hash[:32]}-{self.layout.key}.pak"

    def lookup(self, content_hash: str) -> PackedAdapter | None:
        """The packed copy if memory or a valid file has it (no PEFT parse), else None."""
        with self._lock:
            item = self._items.get(content_hash)
            if item is not None:
                self._items.move_to_end(content_hash)
                return item
        item = self._read(content_hash)
        if item is not None:
            self._keep(item)
        return item

    def get(self, adapter: LoraAdapter) -> PackedAdapter:
        """The packed copy of ``adapter``, converting (and writing it to disk) if needed."""
        item = self.lookup(adapter.content_hash)
        if item is not None:
            return item
        item = pack(adapter, self.layout)
        self._keep(item)
        if self.folder is not None:
            with self._lock:
                self._pending = [f for f in self._pending if not f.done()]
                self._pending.append(self._writer.submit(self._persist, item))
        return item

    def _persist(self, item: PackedAdapter) -> None:
        """Write ``item``'s file, then serve the mapped copy in its place (its RAM is freed)."""
        mapped = self._write(item)
        if mapped is None:
            return
        with self._lock:
            if self._items.get(item.content_hash) is item:
                self._items[item.content_hash] = mapped

    def flush(self) -> None:
        """Wait for the disk writes started so far."""
        with self._lock:
            pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def close(self) -> None:
        self.flush()
        self._writer.shutdown(wait=True)

    def modules(self, item: PackedAdapter) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
        """(layer, projection) -> (A [in, r], B [r, out]) float32, unpacked from the device
        layout (for the CPU workers when the parsed adapter has left the host tier)."""
        out = {}
        w = item.width
        for g, (first, n) in enumerate(self.layout.groups):
            flat, off = item.groups[g], 0
            for p, (din, dout) in zip(self.layout.projections, self.layout.shapes, strict=True):
                a = flat[off : off + n * w * din].reshape(n, w, din)
                off += n * w * din
                b = flat[off : off + n * w * dout].reshape(n, w, dout)
                off += n * w * dout
                r = item.ranks.get(p, 0)
                if not r:
                    continue
                for k in range(n):
                    out[(first + k, p)] = (np.asarray(a[k, :r].T, np.float32),
                                           np.asarray(b[k, :r], np.float32))  # fmt: skip
        return out

    def _keep(self, item: PackedAdapter) -> None:
        with self._lock:
            self._items[item.content_hash] = item
            self._items.move_to_end(item.content_hash)
            held = [k for k, v in self._items.items() if v.source == "memory"]
            total = sum(self._items[k].nbytes for k in held)
            for k in held[:-1]:  # oldest first; the newest always stays
                if total <= self.budget_bytes:
                    break
                total -= self._items.pop(k).nbytes
            while len(self._items) > 4096:
                self._items.popitem(last=False)

    # ------------------------------------------------------------------ disk

    def _read(self, content_hash: str, verify: bool = True) -> PackedAdapter | None:
        """The mapped copy on disk, checked against its digest (``verify``: a file this store
        has just written is not re-read to check it), or None (missing or damaged)."""
        path = self.path(content_hash)
        if path is None or not path.exists():
            return None
        try:
            with open(path, "rb") as f:
                head = f.read(16)
                if head[:8] != MAGIC:
                    raise ValueError("not a packed adapter")
                hlen = int.from_bytes(head[8:16], "little")
                meta = json.loads(f.read(hlen))
            start = -(-(16 + hlen) // _ALIGN) * _ALIGN
            if meta["content_hash"] != content_hash or meta["layout"] != self.layout.key:
                raise ValueError("another adapter or layout")
            width = int(meta["width"])
            sizes = [self.layout.group_elems(g, width) for g in range(len(self.layout.groups))]
            dtype = np.dtype(self.layout.dtype) if self.layout.dtype != "bfloat16" else _bf16()
            total = sum(sizes) * dtype.itemsize
            if path.stat().st_size != start + total:
                raise ValueError(f"truncated ({path.stat().st_size} of {start + total} bytes)")
            mm = np.memmap(path, dtype=dtype, mode="r", offset=start, shape=(sum(sizes),))
            if verify and hashlib.blake2b(mm.view(np.uint8), digest_size=16).hexdigest() != meta[
                "digest"
            ]:
                raise ValueError("content check failed")
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            log.warning("packed copy %s is damaged (%s): rebuilding it", path.name, e)
            self.rebuilt += 1
            try:
                path.unlink()
            except OSError:
                pass
            return None
        groups, off = [], 0
        for n in sizes:
            groups.append(mm[off : off + n])
            off += n
        if verify:
            self.disk_hits += 1
        ranks = {k: int(v) for k, v in meta["ranks"].items()}
        return PackedAdapter(content_hash, width, ranks, groups, "disk")

    def _write(self, item: PackedAdapter) -> PackedAdapter | None:
        """Write atomically (temp file, then rename); the mapped copy, or None if the disk
        refused (the in-memory copy then serves)."""
        path = self.path(item.content_hash)
        if path is None:
            return None
        payload = [np.ascontiguousarray(g).view(np.uint8) for g in item.groups]
        h = hashlib.blake2b(digest_size=16)
        for b in payload:
            h.update(b)
        meta = json.dumps({"content_hash": item.content_hash, "layout": self.layout.key,
                           "width": item.width, "ranks": item.ranks,
                           "digest": h.hexdigest()}).encode()  # fmt: skip
        start = -(-(16 + len(meta)) // _ALIGN) * _ALIGN
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + len(meta).to_bytes(8, "little") + meta)
                f.write(b"\0" * (start - 16 - len(meta)))
                for b in payload:
                    f.write(b.tobytes())
            os.replace(tmp, path)
            tmp = None
        except OSError as e:
            self.write_errors += 1
            log.warning("cannot write the packed copy of adapter %s (%s): it is served from "
                        "memory and its folder", item.content_hash[:12], e)  # fmt: skip
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            return None
        return self._read(item.content_hash, verify=False)
