"""Host/device tiers: content identity, replacement, eviction, pinning, async load handles."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from cara_jax.adapters.device_pool import DevicePool, PoolConfig, PoolFullError
from cara_jax.adapters.store import AdapterRegistry, HostStore, UnknownAdapterError
from cara_jax.scoring import full_logits
from tests.helpers import ALL7, make_peft_adapters

SPECS = {
    f"a{i}": dict(r=r, lora_alpha=2 * r, target_modules=ALL7)
    for i, r in enumerate([8, 16, 8, 32, 8])
}


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    return make_peft_adapters(tiny_llama_dir, tmp_path_factory.mktemp("tier_adapters"), SPECS)


def _logits(tiny, pool, slot, tokens):
    with pool.lock:
        hook = pool.hook(np.array([slot], np.int32), "bgmv")
        return np.asarray(full_logits(tiny, np.array([tokens]), hook))


def test_identity_dedup_and_atomic_replace(tiny, adapters, tmp_path):
    reg = AdapterRegistry(tiny.cfg, HostStore())
    e1 = reg.register("x", adapters["a0"])
    copy_dir = tmp_path / "copy"
    shutil.copytree(adapters["a0"], copy_dir)
    e2 = reg.register("y", copy_dir)
    assert e1.content_hash == e2.content_hash  # identical contents, stored once
    assert reg.resolve("x") is reg.resolve("y")
    pool = DevicePool(tiny.cfg, PoolConfig(budget_bytes=8 << 20))
    old = reg.resolve("x")
    pool.acquire(old).wait(30)  # a running sequence holds the old content
    e3 = reg.register("x", adapters["a1"])  # same name, new contents
    assert e3.content_hash != e1.content_hash
    assert reg.resolve("x").content_hash == e3.content_hash
    assert pool.is_resident(old.content_hash)  # the running sequence keeps the old one
    with pytest.raises(PoolFullError):
        pool.evict(old.content_hash)  # in use
    pool.release(old.content_hash)
    pool.evict(old.content_hash)
    assert not pool.is_resident(old.content_hash)
    reg.unregister("x")
    with pytest.raises(UnknownAdapterError):
        reg.resolve("x")
    pool.close()


def test_device_eviction_lru_pinning_and_reload(tiny, adapters):
    reg = AdapterRegistry(tiny.cfg, HostStore(budget_bytes=1))  # host tier keeps only the newest
    for name, path in adapters.items():
        reg.register(name, path)
    cfg = tiny.cfg
    per_rank_row = sum(i + o for i, o in cfg.projection_shapes().values()) * cfg.num_layers * 4
    # room for 40 rank rows per projection: a few adapters, not all five (8+16+8+32+8 = 72)
    pool = DevicePool(cfg, PoolConfig(budget_bytes=40 * per_rank_row, max_rank=64))
    assert pool.rows_per_proj == 40
    tokens = list(range(5, 17))
    first = {}
    for name in ["a0", "a1", "a2"]:
        a = reg.resolve(name)  # re-read from disk when the host tier evicted it
        h = pool.acquire(a)
        h.wait(30)
        assert h.nbytes == a.max_rank * per_rank_row and h.seconds is not None
        assert h.ready_layers() == list(range(cfg.num_layers))
        first[name] = _logits(tiny, pool, pool.slot_of(a.content_hash), tokens)
        pool.release(a.content_hash)
    assert reg.host.evictions > 0
    pool.pin(reg.entry("a0").content_hash)
    a3 = reg.resolve("a3")  # rank 32: must evict idle, unpinned adapters (LRU: a1 then a2)
    pool.acquire(a3).wait(30)
    resident = set(pool.resident())
    assert reg.entry("a0").content_hash in resident  # pinned
    assert reg.entry("a1").content_hash not in resident
    assert pool.stats.evictions >= 1
    # everything in use or pinned: a new adapter cannot fit
    with pytest.raises(PoolFullError):
        pool.acquire(reg.resolve("a1"))
    pool.release(a3.content_hash)
    pool.pin(reg.entry("a0").content_hash, False)
    # reload the evicted ones: same outputs as before eviction
    for name in ["a1", "a2"]:
        a = reg.resolve(name)
        pool.acquire(a).wait(30)
        again = _logits(tiny, pool, pool.slot_of(a.content_hash), tokens)
        np.testing.assert_allclose(again, first[name], rtol=0, atol=1e-6)
        pool.release(a.content_hash)
    pool.close()


def test_load_handle_reports_layer_groups(tiny, adapters):
    reg = AdapterRegistry(tiny.cfg)
    reg.register("a", adapters["a3"])
    pool = DevicePool(tiny.cfg, PoolConfig(budget_bytes=16 << 20, layer_groups=3))
    h = pool.acquire(reg.resolve("a"))
    assert len(h.groups) == 3 and [list(g) for g in h.groups] == [[0], [1], [2]]
    h.wait(30)
    assert all(s is not None and s >= 0 for s in h.group_seconds)
    assert all(h.layer_ready(i) for i in range(tiny.cfg.num_layers))
    assert pool.stats.misses == 1
    pool.acquire(reg.resolve("a"))
    assert pool.stats.hits == 1
    pool.close()
