"""Adapters in the device layout: converted once, on disk, memory-mapped, never served damaged."""

from __future__ import annotations

import numpy as np
import pytest

from cara_jax.adapters.device_pool import DevicePool, PoolConfig
from cara_jax.adapters.packed import PackedStore, write_width
from cara_jax.adapters.peft import load_peft_adapter
from tests.helpers import ADAPTERS, make_peft_adapters

SPECS = {k: ADAPTERS[k] for k in ("r8", "r64_qv", "r128_pattern")}


@pytest.fixture(scope="module")
def adapters(tiny, tiny_llama_dir, tmp_path_factory):
    paths = make_peft_adapters(tiny_llama_dir, tmp_path_factory.mktemp("pk"), SPECS)
    return {n: load_peft_adapter(p, tiny.cfg) for n, p in paths.items()}


def _pool(tiny, folder, **kw):
    return DevicePool(tiny.cfg, PoolConfig(budget_bytes=4 << 20, max_rank=128, layer_groups=2,
                                           cache_dir=None if folder is None else str(folder),
                                           **kw))  # fmt: skip


def _check_rows(pool, adapter):
    """The pool holds exactly the adapter's A^T and B rows, in the slot's rows."""
    slot = pool.slot_of(adapter.content_hash)
    for (layer, p), m in adapter.modules.items():
        rows = pool._slot_rows[p][slot, : pool._slot_rank[p][slot]]
        a = np.asarray(pool.a[p][layer])[rows[: m.rank]]
        b = np.asarray(pool.b[p][layer])[rows[: m.rank]]
        np.testing.assert_array_equal(a, m.a.T)
        np.testing.assert_array_equal(b, m.b)
        assert not np.asarray(pool.a[p][layer])[rows[m.rank :]].any()  # padding rows: zeros


def test_packed_copy_round_trips_through_disk_and_loads_the_same_rows(tiny, adapters, tmp_path):
    pool = _pool(tiny, tmp_path)
    for a in adapters.values():
        assert pool.prepare(a).source == "memory"  # served at once; its file is written after
    pool.packed.flush()
    for a in adapters.values():
        packed = pool.packed.lookup(a.content_hash)
        assert packed.source == "disk" and pool.packed.path(a.content_hash).exists()
        assert isinstance(packed.groups[0], np.memmap)  # the mapped copy replaced the RAM one
    # a new process: the copies come from disk, mapped, without the adapters' folders
    pool2 = _pool(tiny, tmp_path)
    for a in adapters.values():
        packed = pool2.packed.lookup(a.content_hash)
        assert packed is not None and packed.source == "disk"
        assert isinstance(packed.groups[0], np.memmap)
        pool2.acquire(packed).wait(60)
        _check_rows(pool2, a)
    assert pool2.packed.disk_hits == len(adapters)
    pool.close()
    pool2.close()


def test_a_copy_holds_only_the_targeted_projections_at_their_own_widths(tiny, adapters):
    """A q/v adapter copies q/v rows; a rank_pattern adapter's small projections are not
    padded to its largest rank (the copy is the adapter's bytes, rounded per projection)."""
    pool = _pool(tiny, None)
    shapes = tiny.cfg.projection_shapes()
    for a in adapters.values():
        packed = pool.prepare(a)
        ranks: dict[str, int] = {}
        for (_, p), m in a.modules.items():
            ranks[p] = max(ranks.get(p, 0), m.rank)
        assert packed.widths == {p: write_width(r) for p, r in ranks.items()}
        elems = sum(tiny.cfg.num_layers * write_width(r) * sum(shapes[p]) for p, r in ranks.items())
        assert packed.nbytes == elems * 4
    qv = pool.prepare(adapters["r64_qv"])
    assert set(qv.widths) == {"q_proj", "v_proj"}
    pattern = pool.prepare(adapters["r128_pattern"]).widths
    assert len(set(pattern.values())) > 1, pattern  # its ranks differ by projection
    pool.close()


@pytest.mark.parametrize("damage", ["truncate", "flip", "header"])
def test_a_damaged_copy_is_rebuilt_never_served(tiny, adapters, tmp_path, damage):
    a = adapters["r8"]
    first = _pool(tiny, tmp_path)
    first.prepare(a)
    first.close()  # its file written
    pool = _pool(tiny, tmp_path)
    path = pool.packed.path(a.content_hash)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "flip":
        raw[-5] ^= 0xFF  # one weight byte
    else:
        raw[20] ^= 0xFF  # inside the JSON header
    path.write_bytes(bytes(raw))
    assert pool.packed.lookup(a.content_hash) is None
    assert pool.packed.rebuilt == 1 and not path.exists()
    pool.prepare(a)  # converted again from the parsed adapter and written anew
    pool.packed.flush()
    assert pool.packed.lookup(a.content_hash).source == "disk" and path.exists()
    pool.acquire(a).wait(60)
    _check_rows(pool, a)
    pool.close()


def test_a_disk_that_refuses_writes_leaves_the_adapter_servable(tiny, adapters, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    pool = _pool(tiny, blocker / "adapters")
    a = adapters["r128_pattern"]
    pool.prepare(a)
    pool.packed.flush()
    packed = pool.packed.lookup(a.content_hash)
    assert packed.source == "memory" and pool.packed.write_errors == 1
    pool.acquire(a).wait(60)
    _check_rows(pool, a)
    pool.close()


def test_memory_only_store_keeps_within_its_budget(tiny, adapters):
    pool = _pool(tiny, None)
    store: PackedStore = pool.packed
    store.budget_bytes = 1  # below any adapter: only the newest copy stays
    for a in adapters.values():
        pool.prepare(a)
    held = [v for v in store._items.values() if v.source == "memory"]
    assert [v.content_hash for v in held] == [adapters["r128_pattern"].content_hash]
    # an evicted copy is converted again when it is needed
    pool.acquire(adapters["r8"]).wait(60)
    _check_rows(pool, adapters["r8"])
    pool.close()


def test_unpacked_modules_give_the_adapters_deltas(tiny, adapters, tmp_path):
    """The CPU workers can be fed from the mapped copy when the parsed adapter is gone."""
    pool = _pool(tiny, tmp_path)
    rng = np.random.default_rng(0)
    for a in adapters.values():
        mods = pool.packed.modules(pool.prepare(a))
        assert set(mods) == set(a.modules)
        for (layer, p), m in a.modules.items():
            x = rng.normal(size=(3, m.a.shape[0])).astype(np.float32)
            ua, ub = mods[(layer, p)]
            np.testing.assert_allclose(x @ ua @ ub, x @ m.a @ m.b, rtol=1e-5, atol=1e-6)
    pool.close()
