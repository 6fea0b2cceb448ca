"""Adapters in the device pool's layout: converted once, kept on disk, memory-mapped.

A cold load should cost its copy and nothing else. So an adapter is converted to the pool's
layout and dtype once (``PackedStore.get``, at registration) and the result is written to disk
under its content hash, by a writer thread (the request that registered it does not wait for
the file: until it lands the copy is served from memory). Later loads, in this process or the
next, map that file: no safetensors parse, no transposes, no padding. Each layer group is one
contiguous slice of it, each projection a contiguous part of that slice, so a group's load is,
per targeted projection, one host-to-device transfer and one write program (pool_write.py).

Layout, per layer group g (layers n_g), for each pool projection p the adapter targets, in the
pool's order: A^T as [n_g, w_p, in_p], then B (scaling folded in) as [n_g, w_p, out_p]; w_p is
that projection's write width (its rank rounded up to a power of two, at least 8). Rows beyond
a projection's rank are zeros; projections the adapter does not target take no bytes, so a
rank-128 q/k/v/o adapter's copy is its own 59 MB (SmolLM2, float32), not the 156 MB it took
when every pool projection was laid out at the adapter's largest rank (format 1).

A DoRA adapter's magnitude vectors follow the groups, float32, per projection it targets (in
the pool's order) as [layers, out] (zeros where a layer has none); the header lists those
layers (``dora``). LoRA on the embedding or the LM head (peft_vocab.py) comes last, float32,
per kind (``embed_tokens`` then ``lm_head``) its A rows [r, in] then its B rows [r, out]; the
header gives each kind's (r, in, out) (``vocab``).

File: an 8-byte magic, an 8-byte header length, a JSON header (content hash, layout key,
ranks per projection, a BLAKE2 digest of the payload), the payload at a 64-byte boundary. A
file that is truncated, of another layout, or whose digest does not match is never served: it
is rebuilt from the adapter. If the disk is full or read-only the converted copy stays in
memory and the adapter is served from its folder as before.
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
FORMAT = 2
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

    def parts(self, g: int, widths: dict[str, int]) -> list[tuple[str, int, int, int]]:
        """(projection, offset, elements, width) of each projection in group g's payload."""
        n, out, off = self.groups[g][1], [], 0
        for p, (din, dout) in zip(self.projections, self.shapes, strict=True):
            w = widths.get(p, 0)
            if w:
                out.append((p, off, n * w * (din + dout), w))
                off += n * w * (din + dout)
        return out

    def group_elems(self, g: int, widths: dict[str, int]) -> int:
        return sum(size for _, _, size, _ in self.parts(g, widths))

    def shape_of(self, p: str) -> tuple[int, int]:
        return self.shapes[self.projections.index(p)]


@dataclasses.dataclass
class PackedAdapter:
    """One adapter in a pool's layout; ``groups[g]`` is the flat payload of layer group g."""

    content_hash: str
    ranks: dict[str, int]  # rank rows per projection (0: not targeted)
    groups: list[np.ndarray]
    source: str  # "disk" (memory-mapped file) or "memory" (converted, not on disk)
    # DoRA: per projection, the layers with a magnitude and the magnitudes [num_layers, out]
    dora_layers: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    magnitudes: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    # LoRA on the embedding / LM head: kind -> (A rows [r, in], B rows [r, out]) float32
    vocab: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)

    @property
    def dora(self) -> bool:
        return bool(self.dora_layers)

    @property
    def vocab_ranks(self) -> dict[str, int]:
        return {k: int(a.shape[0]) for k, (a, _) in self.vocab.items()}

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)

    @property
    def widths(self) -> dict[str, int]:
        """Write width per targeted projection (pool_write.py has one program per width)."""
        return {p: write_width(r) for p, r in self.ranks.items() if r}

    @property
    def nbytes(self) -> int:
        """Bytes a load copies to the device."""
        return sum(int(g.nbytes) for g in self.groups) + sum(
            int(a.nbytes) + int(b.nbytes) for a, b in self.vocab.values())


def pack(adapter: LoraAdapter, layout: PoolLayout) -> PackedAdapter:
    """Convert a parsed adapter to the pool's layout (the one-time conversion)."""
    ranks: dict[str, int] = {}
    for (_, p), m in adapter.modules.items():
        if p not in layout.projections:
            raise ValueError(f"this pool does not hold projection {p}")
        ranks[p] = max(ranks.get(p, 0), m.rank)
    widths = {p: write_width(r) for p, r in ranks.items()}
    dtype = np.dtype(layout.dtype) if layout.dtype != "bfloat16" else _bf16()
    groups = []
    for g, (first, n) in enumerate(layout.groups):
        flat = np.zeros(layout.group_elems(g, widths), dtype)
        for p, a, b in _views(layout, g, widths, flat):
            for k in range(n):
                m = adapter.modules.get((first + k, p))
                if m is not None:
                    a[k, : m.rank] = m.a.T
                    b[k, : m.rank] = m.b
        groups.append(flat)
    layers, mags = {}, {}
    num_layers = sum(n for _, n in layout.groups)
    for p, (_, dout) in zip(layout.projections, layout.shapes, strict=True):
        have = sorted(i for (i, q), m in adapter.modules.items() if q == p and m.m is not None)
        if have:
            layers[p] = have
            mags[p] = np.zeros((num_layers, dout), np.float32)
            for i in have:
                mags[p][i] = adapter.modules[(i, p)].m
    vocab = {k: (np.ascontiguousarray(a.T, np.float32), np.asarray(b, np.float32))
             for k, (a, b) in sorted(adapter.vocab.modules.items())}  # fmt: skip
    return PackedAdapter(adapter.content_hash, ranks, groups, "memory", layers, mags, vocab)


def _views(layout: PoolLayout, g: int, widths: dict[str, int], flat: np.ndarray):
    """(projection, A^T [n, w, in], B [n, w, out]) views of group g's payload."""
    n = layout.groups[g][1]
    for p, off, _, w in layout.parts(g, widths):
        din, dout = layout.shape_of(p)
        a = flat[off : off + n * w * din].reshape(n, w, din)
        b = flat[off + n * w * din : off + n * w * (din + dout)].reshape(n, w, dout)
        yield p, a, b


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
        for g, (first, n) in enumerate(self.layout.groups):
            for p, a, b in _views(self.layout, g, item.widths, item.groups[g]):
                r = item.ranks[p]
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
            ranks = {k: int(v) for k, v in meta["ranks"].items()}
            widths = {p: write_width(r) for p, r in ranks.items() if r}
            sizes = [self.layout.group_elems(g, widths) for g in range(len(self.layout.groups))]
            dtype = np.dtype(self.layout.dtype) if self.layout.dtype != "bfloat16" else _bf16()
            dora = {p: [int(i) for i in v] for p, v in meta.get("dora", {}).items()}
            num_layers = sum(n for _, n in self.layout.groups)
            mag_elems = sum(num_layers * self.layout.shape_of(p)[1] for p in dora)
            vocab_dims = {k: tuple(int(x) for x in v) for k, v in meta.get("vocab", {}).items()}
            vocab_elems = sum(r * (i + o) for r, i, o in vocab_dims.values())
            tail_elems = mag_elems + vocab_elems
            total = sum(sizes) * dtype.itemsize + tail_elems * 4
            if path.stat().st_size != start + total:
                raise ValueError(f"truncated ({path.stat().st_size} of {start + total} bytes)")
            mm = np.memmap(path, dtype=dtype, mode="r", offset=start, shape=(sum(sizes),))
            tail = np.memmap(path, dtype=np.float32, mode="r",
                             offset=start + sum(sizes) * dtype.itemsize,
                             shape=(tail_elems,)) if tail_elems else None  # fmt: skip
            if verify:
                h = hashlib.blake2b(mm.view(np.uint8), digest_size=16)
                if tail is not None:
                    h.update(tail.view(np.uint8))
                if h.hexdigest() != meta["digest"]:
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
        mags, vocab, off = {}, {}, 0
        for p in (q for q in self.layout.projections if q in dora):
            n = num_layers * self.layout.shape_of(p)[1]
            mags[p] = tail[off : off + n].reshape(num_layers, -1)
            off += n
        for k, (r, din, dout) in sorted(vocab_dims.items()):
            a = tail[off : off + r * din].reshape(r, din)
            b = tail[off + r * din : off + r * (din + dout)].reshape(r, dout)
            vocab[k] = (a, b)
            off += r * (din + dout)
        if verify:
            self.disk_hits += 1
        return PackedAdapter(content_hash, ranks, groups, "disk", dora, mags, vocab)

    def _write(self, item: PackedAdapter) -> PackedAdapter | None:
        """Write atomically (temp file, then rename); the mapped copy, or None if the disk
        refused (the in-memory copy then serves)."""
        path = self.path(item.content_hash)
        if path is None:
            return None
        payload = [np.ascontiguousarray(g).view(np.uint8) for g in item.groups]
        payload += [np.ascontiguousarray(item.magnitudes[p], np.float32).view(np.uint8).reshape(-1)
                    for p in self.layout.projections if p in item.dora_layers]  # fmt: skip
        for _, (a, b) in sorted(item.vocab.items()):
            payload += [np.ascontiguousarray(x, np.float32).view(np.uint8).reshape(-1) for x in (a, b)]
        h = hashlib.blake2b(digest_size=16)
        for b in payload:
            h.update(b)
        head = {"content_hash": item.content_hash, "layout": self.layout.key,
                "ranks": item.ranks, "digest": h.hexdigest()}  # fmt: skip
        if item.dora_layers:
            head["dora"] = item.dora_layers
        if item.vocab:
            head["vocab"] = {k: [a.shape[0], a.shape[1], b.shape[1]] for k, (a, b) in item.vocab.items()}
        meta = json.dumps(head).encode()
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
