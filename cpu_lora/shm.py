"""Shared-memory layout of the CPU LoRA pool, used by the coordinator and the workers alike.

Three kinds of POSIX shared-memory segments, all named ``<prefix><pool tag>_<kind>``, created and
unlinked only by the coordinator (workers attach without registering them with a resource
tracker, so no process but the owner ever unlinks or warns about them):

- ``ctrl``: int64 words. A header (stop flag, data generation, adapter epoch), one 128-byte row
  per worker (job word, done word, token range, status, timing, test hook), the current job's
  description (layer, tokens, input width, segment table, projection table) and a 256-byte error
  text per worker. Rows are 16 words (two cache lines) apart, so workers never share a line.
- ``d<gen>``: float32 data. The job's input x [T, in] at offset 0, then one [T, out] result block
  per projection. It grows by replacement (a new generation) when a job does not fit.
- ``a<id>``: one adapter. An int64 index (layer, projection id, A offset, in, r, B offset, out) and
  then every A [in, r] and B [r, out] as float32, so a worker reads the index from the segment
  itself: nothing about an adapter is pickled or sent through a pipe.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Mapping
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import numpy as np

from cara_jax.config import PROJECTIONS

SHM_PREFIX = "cara_lora_"
PROJ_ID = {p: i for i, p in enumerate(PROJECTIONS)}

ROW = 16  # int64 words per worker row / header / job description
MSG_BYTES = 256
ALIGN = 16  # float32 elements (64 bytes) between blocks of the data segment

# header words
H_STOP, H_DATA_GEN, H_DATA_WORDS, H_ADAPTER_EPOCH = range(4)
# worker row words; JOB is written last by the coordinator, DONE last by the worker
W_JOB, W_DONE, W_T0, W_T1, W_STATUS, W_COMPUTE_NS, W_HANG_MS, W_PID, W_READY, W_FLOPS = range(10)
# job description words
J_LAYER, J_TOKENS, J_DIN, J_NSEG, J_NPROJ = range(5)
SEG_FIELDS = 3  # start, end, adapter id
PROJ_FIELDS = 3  # projection id, result offset (elements), width
IDX_FIELDS = 7  # layer, projection id, a offset, in, r, b offset, out

_attach_lock = threading.Lock()


class Segment(shared_memory.SharedMemory):
    """SharedMemory whose close() tolerates numpy views still alive (the mapping then stays
    until the process exits), so garbage collection never prints BufferError noise."""

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            super().close()


def create_segment(name: str, nbytes: int) -> Segment:
    """A new segment owned (and eventually unlinked) by the calling process."""
    return Segment(name=name, create=True, size=max(int(nbytes), 8))


def attach_segment(name: str) -> Segment:
    """Attach an existing segment without registering it with this process's resource tracker:
    the owner unlinks it, and a tracker of an attaching process would otherwise warn about (or
    unlink) a segment it does not own."""
    if sys.version_info >= (3, 13):
        return Segment(name=name, track=False)  # type: ignore[call-arg]
    with _attach_lock:
        register = resource_tracker.register
        resource_tracker.register = lambda *a, **k: None  # type: ignore[assignment]
        try:
            return Segment(name=name)
        finally:
            resource_tracker.register = register  # type: ignore[assignment]


def ctrl_nbytes(num_workers: int, max_segments: int, max_projs: int) -> int:
    words = ROW * (2 + num_workers) + SEG_FIELDS * max_segments + PROJ_FIELDS * max_projs
    return words * 8 + MSG_BYTES * num_workers


class CtrlView:
    """numpy views of the ctrl segment; the same layout on both sides."""

    def __init__(self, buf: memoryview, num_workers: int, max_segments: int, max_projs: int):
        words = np.ndarray(
            (ROW * (2 + num_workers) + SEG_FIELDS * max_segments + PROJ_FIELDS * max_projs,),
            np.int64,
            buf,
        )
        self.header = words[:ROW]
        self.rows = words[ROW : ROW * (1 + num_workers)].reshape(num_workers, ROW)
        self.job = words[ROW * (1 + num_workers) : ROW * (2 + num_workers)]
        o = ROW * (2 + num_workers)
        self.segs = words[o : o + SEG_FIELDS * max_segments].reshape(max_segments, SEG_FIELDS)
        o += SEG_FIELDS * max_segments
        self.projs = words[o : o + PROJ_FIELDS * max_projs].reshape(max_projs, PROJ_FIELDS)
        self.msgs = np.ndarray((num_workers, MSG_BYTES), np.uint8, buf, offset=words.nbytes)

    def set_message(self, w: int, text: str) -> None:
        raw = text.encode("utf-8", "replace")[: MSG_BYTES - 1]
        self.msgs[w, :] = 0
        self.msgs[w, : len(raw)] = np.frombuffer(raw, np.uint8)

    def message(self, w: int) -> str:
        raw = self.msgs[w].tobytes()
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _pair(m: Any) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) from a tuple or from an object with .a and .b (cara_jax's LoraModule)."""
    a, b = (m.a, m.b) if hasattr(m, "a") else m
    return np.asarray(a), np.asarray(b)


def pack_adapter(
    name: str, modules: Mapping[tuple[int, str], Any]
) -> tuple[Segment, dict[tuple[int, int], tuple[int, int, int]]]:
    """Copy an adapter into a new segment; returns it and {(layer, proj id): (in, r, out)}."""
    entries, shapes, off = [], {}, 0
    pairs = []
    for (layer, proj), m in modules.items():
        if proj not in PROJ_ID:
            raise ValueError(f"unknown projection {proj!r}; expected one of {PROJECTIONS}")
        a, b = _pair(m)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(
                f"layer {layer} {proj}: A {a.shape} / B {b.shape} are not [in, r] / [r, out]"
            )
        din, r = a.shape
        dout = b.shape[1]
        a_off = off
        b_off = aligned(a_off + din * r)
        off = aligned(b_off + r * dout)
        entries.append((int(layer), PROJ_ID[proj], a_off, din, r, b_off, dout))
        shapes[(int(layer), PROJ_ID[proj])] = (din, r, dout)
        pairs.append((a, b))
    head = aligned(2 * (1 + IDX_FIELDS * len(entries)))  # int64 words counted as float32 slots
    shm = create_segment(name, (head + off) * 4)
    try:
        index = np.ndarray((1 + IDX_FIELDS * len(entries),), np.int64, shm.buf)
        index[0] = len(entries)
        if entries:
            index[1:] = np.asarray(entries, np.int64).ravel()
        flat = np.ndarray((off,), np.float32, shm.buf, offset=head * 4)
        for (_, _, a_off, din, r, b_off, dout), (a, b) in zip(entries, pairs, strict=True):
            flat[a_off : a_off + din * r].reshape(din, r)[:] = a  # converts bf16/fp16/fp64
            flat[b_off : b_off + r * dout].reshape(r, dout)[:] = b
        del index, flat
    except BaseException:
        shm.close()
        shm.unlink()
        raise
    return shm, shapes


def read_adapter(shm: shared_memory.SharedMemory) -> dict[tuple[int, int], tuple[Any, Any]]:
    """Views {(layer, proj id): (A [in, r], B [r, out])} into an attached adapter segment."""
    n = int(np.ndarray((1,), np.int64, shm.buf)[0])
    idx = np.ndarray((n, IDX_FIELDS), np.int64, shm.buf, offset=8)
    head = aligned(2 * (1 + IDX_FIELDS * n))
    total = (shm.size // 4) - head
    flat = np.ndarray((total,), np.float32, shm.buf, offset=head * 4)
    out = {}
    for layer, pid, a_off, din, r, b_off, dout in idx.tolist():
        out[(layer, pid)] = (
            flat[a_off : a_off + din * r].reshape(din, r),
            flat[b_off : b_off + r * dout].reshape(r, dout),
        )
    return out
