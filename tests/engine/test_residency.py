"""Adapter residency without a model: a long-running server's load history stays bounded, and
the typed answers the scheduler gets."""

from __future__ import annotations

import sys
import threading

from cara_jax.adapters.device_pool import DevicePool, PoolConfig
from cara_jax.adapters.store import AdapterRegistry, HostStore
from cara_jax.engine.records import LOAD_BUCKETS
from cara_jax.engine.residency import AdapterResidency, Readiness
from cara_jax.engine.sequence import Sequence
from cara_jax.sampling_params import SamplingParams
from server.demo import write_demo_adapter
from tests.helpers import TINY_CFG as CFG


def _residency(mode="sync", **pool):
    pc = PoolConfig(budget_bytes=1 << 20, max_adapters=4, max_rank=16, **pool)
    return AdapterResidency(CFG, DevicePool(CFG, pc), AdapterRegistry(CFG, HostStore(1 << 20)),
                            mode)  # fmt: skip


def _seq(name, content_hash):
    return Sequence(name, [1, 2, 3], SamplingParams(), 0, None, frozenset(), name, content_hash)


def test_thousand_adapters_keep_the_load_history_bounded(tmp_path):
    res = _residency()
    sizes = []
    for i in range(1000):
        path = tmp_path / f"a{i}"
        write_demo_adapter(path, CFG, rank=8 if i % 2 else 16, seed=i)
        entry = res.register(f"a{i}", path)
        seq = _seq(f"a{i}", entry.content_hash)
        assert res.acquire(seq)
        res.pool.handle_of(entry.content_hash).wait(30)
        res.begin_step()  # what the engine does before each step: drains the load events
        res.finished(seq)
        res.unregister(f"a{i}")
        path.joinpath("adapter_model.safetensors").unlink()
        if i % 100 == 99:
            sizes.append((len(res.pool._load_events), len(res.registry.names()),
                          len(res.pool.resident()), sys.getsizeof(res.loads.counts)))  # fmt: skip
    st = res.stats()
    assert st["loads"]["count"] == 1000 and st["loads"]["buckets"][-1] == (float("inf"), 1000)
    assert len(st["loads"]["buckets"]) == len(LOAD_BUCKETS) + 1
    assert st["misses"] == 1000 and st["evictions"] >= 1000 - 3  # the pool keeps at most 3
    assert len(set(sizes)) == 1, sizes  # the same at 100 adapters as at 1,000
    assert sizes[0][0] == 0 and sizes[0][1] == 0 and sizes[0][2] <= 3
    res.close()


def test_readiness_answers(tmp_path):
    """sync: a cold adapter's request is NOT_YET until its load lands (or within the wait it
    is given), then READY with its slot; a base request is READY at once."""
    gate = threading.Event()
    res = _residency()
    res.pool.group_gate = lambda _h, _g: gate.wait(30)  # hold the copy until the gate opens
    write_demo_adapter(tmp_path / "x", CFG, rank=8, seed=1)
    entry = res.register("x", tmp_path / "x")
    base = _seq("b", None)
    assert res.ready(base, 3, 0.0, 0.0) == (Readiness.READY, 0.0)
    seq = _seq("x", entry.content_hash)
    answer, waited = res.ready(seq, 3, 0.0, 0.0)
    assert answer is Readiness.NOT_YET and seq.hold.cold and seq.hold.acquired
    gate.set()
    answer, waited = res.ready(seq, 3, 30.0, 0.0)  # waits (up to 30 s) for the load to land
    assert answer is Readiness.READY and 0 <= waited < 30 and seq.hold.slot > 0
    assert res.finished(seq) == ("sync", "resident") and not seq.hold.acquired
    res.close()
