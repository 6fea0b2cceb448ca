"""Adapters composed per request, without a model: weighted kernels, parsing, mixture slots in
the pool and their limits. The engine's scaled and mixed requests against PEFT are in
test_multi_lora_parity.py (``test_engine_paths_match_peft``, one engine for plain and mixed
rows) and, through the server, in tests/server/test_server.py."""

from __future__ import annotations

import threading

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from cara_jax.adapters.device_pool import DevicePool, PoolConfig
from cara_jax.adapters.mixture import LoraRef, MixtureError, mixture_key, parse_mixture
from cara_jax.adapters.multi_lora import bgmv, mbgmv, mbgmv_blocks, row_lora, sgmv
from cara_jax.adapters.store import AdapterRegistry, HostStore
from cara_jax.engine.residency import AdapterResidency, Readiness
from cara_jax.engine.sequence import Sequence
from cara_jax.sampling_params import InvalidRequestError, SamplingParams
from server.demo import write_demo_adapter
from tests.helpers import (
    TINY_CFG,
    make_pool,
)


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                               atol=1e-5 * float(np.abs(np.asarray(want)).max()))  # fmt: skip


def test_weighted_kernels_weigh_each_rank_row():
    """Every kernel, reference and Pallas (interpreted), with per-rank-row weights equals the
    same rows with the weights folded into A (what a merged copy would hold)."""
    rng = np.random.default_rng(3)
    din, dout, ranks = 64, 48, [8, 16, 4]
    p = make_pool(rng, din, dout, ranks, "float32", cap=32)
    rows = p.slot_rows[[1, 2, 3, 0], :16]  # [B, R]: the three adapters and a base row
    w = rng.uniform(-1.5, 1.5, rows.shape).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((4, din)), jnp.float32)
    a, b = p.a, p.b

    def folded(x, rows, w):  # per row: x . (w * A_rows)^T . B_rows
        ga = np.asarray(a)[rows] * w[..., None]
        return np.einsum("bi,bri,bro->bo", np.asarray(x), ga, np.asarray(b)[rows])

    want = folded(x, rows, w)
    _close(bgmv(x, a, b, rows, w), want)
    _close(pk.bgmv(x, a, b, rows, w, interpret=True), want)
    flat_rows, flat_w = rows.reshape(-1), w.reshape(-1)
    owner = np.repeat(np.arange(4), 16).astype(np.int32)
    _close(mbgmv(x, a, b, flat_rows, owner, flat_w), want)
    _close(pk.mbgmv(x, a, b, flat_rows, owner, flat_w, interpret=True), want)
    _close(mbgmv_blocks(x, a, b, rows, np.arange(4, dtype=np.int32), w), want)
    xs = jnp.asarray(rng.standard_normal((4, 5, din)), jnp.float32)  # 4 rows of 5 tokens
    want_t = np.stack([folded(xs[:, t], rows, w) for t in range(5)], axis=1)
    _close(row_lora(xs, a, b, rows, w), want_t)
    sizes = jnp.full((4,), 5, jnp.int32)
    flat_x = xs.reshape(20, din)
    _close(sgmv(flat_x, a, b, rows, sizes, w).reshape(4, 5, -1), want_t)
    _close(pk.sgmv(flat_x, a, b, rows, sizes, w, interpret=True).reshape(4, 5, -1), want_t)
    ones = np.ones_like(w)  # weight 1 is the unweighted kernel, bit for bit
    assert np.array_equal(np.asarray(bgmv(x, a, b, rows, ones)), np.asarray(bgmv(x, a, b, rows)))


def test_parse_mixture_shapes_and_errors():
    assert parse_mixture([{"name": "a", "scale": 0.5}, ("b", 2), LoraRef("c")], 4) == (
        LoraRef("a", 0.5), LoraRef("b", 2.0), LoraRef("c", 1.0))
    bad = [
        ("a", 4), ([], 4), ([{"name": "a"}] * 2, 4), ([{"name": "a", "scale": "x"}], 4),
        ([{"name": "a", "scale": float("nan")}], 4), ([{"id": 0, "scale": 1}], 4),
        ([{"name": "a", "weight": 1}], 4), ([("a", 1), ("b", 1), ("c", 1)], 2), ([{"scale": 1}], 4),
        ([{"name": "a", "scale": 10**400}], 4), ([{"name": "a", "scale": 1e39}], 4),
        ({"name": "a"}, 4), ([{"name": "a", "scale": True}], 4),
    ]  # fmt: skip
    for spec, limit in bad:
        with pytest.raises(MixtureError):
            parse_mixture(spec, limit)
    assert mixture_key([("h1", 0.5)]) != mixture_key([("h1", 0.5000001)])
    assert parse_mixture([("a", -0.0)], 4)[0].scale == 0.0  # one key for scale 0
    assert parse_mixture([("a", np.float32(0.5))], 4)[0].scale == 0.5


def _residency(tmp_path, max_adapters=5):
    tmp_path.mkdir(exist_ok=True)
    cfg = TINY_CFG
    pc = PoolConfig(budget_bytes=1 << 20, max_adapters=max_adapters, max_rank=24)
    res = AdapterResidency(cfg, DevicePool(cfg, pc), AdapterRegistry(cfg, HostStore(1 << 20)),
                           "sync")  # fmt: skip
    for name, rank, seed in (("x", 8, 1), ("y", 16, 2), ("z", 8, 3)):
        write_demo_adapter(tmp_path / name, cfg, rank=rank, seed=seed)
        res.register(name, tmp_path / name)
    res.register("x2", tmp_path / "x")  # another name for x's content
    return res


def _seq(res, rid, lora):
    use = res.adapter_use(None, lora, 4)
    return Sequence(rid, [1, 2, 3], SamplingParams(), 0, None, frozenset(), use.label,
                    use.content_hash, use.rank, mixture=use.mixture)  # fmt: skip


def test_mixture_slot_lists_member_rows_with_weights(tmp_path):
    """A mixture's slot: its members' rows in order, their weights, summed rank; the members
    are held while it is in the pool and evictable after it goes; the dense hook refuses it."""
    res = _residency(tmp_path)
    pool = res.pool
    seq = _seq(res, "m", [{"name": "x", "scale": 0.5}, {"name": "y", "scale": -2}])
    assert seq.rank == res.entry("x").cost_rank + res.entry("y").cost_rank
    assert seq.adapter_names == ("x", "y")
    answer, _ = res.ready(seq, 3, 30.0, 0.0)  # sync: waits for both members' loads
    assert answer is Readiness.READY
    hx, hy = (res.entry(n).content_hash for n in "xy")
    slot = seq.hold.slot
    targeted = 0
    weight = {hx: 0.5, hy: -2.0}
    order = [h for _, h, _ in seq.mixture]  # members in content order (mixture.merge_members)
    assert sorted(order) == order and set(order) == {hx, hy}
    for p in pool.projections:
        parts = [pool._entries[h].rows.get(p, np.zeros(0, np.int32)) for h in order]
        n = sum(len(r) for r in parts)
        targeted += n > 0
        assert pool._slot_rank[p][slot] == n
        assert np.array_equal(pool._slot_rows[p][slot, :n], np.concatenate(parts))
        assert np.array_equal(pool._slot_w[p][slot, :n],
                              np.concatenate([[weight[h]] * len(r) for h, r in zip(order, parts, strict=True)]))
    assert targeted and max(pool._slot_rank[p][slot] for p in pool.projections) == 24
    assert pool._entries[hx].refcount == 1 and pool._entries[hy].refcount == 1
    with pytest.raises(ValueError, match="dense hook"):
        pool.hook(np.array([slot]))
    same = _seq(res, "m2", [("y", -2), ("x", 0.5)])  # the same delta: the same key and slot
    assert same.content_hash == seq.content_hash
    assert res.ready(same, 3, 30.0, 0.0)[0] is Readiness.READY and same.hold.slot == slot
    res.finished(seq)
    res.finished(same)
    pool.evict(hx)  # the idle mixture holding x goes first, then x
    assert pool.handle_of(seq.content_hash) is None and pool.handle_of(hx) is None
    assert pool._entries[hy].refcount == 0
    assert (pool._slot_w[next(iter(pool.projections))][slot] == 1.0).all()  # the slot is reset
    res.close()


def test_mixture_falls_with_a_failed_member_and_frees_its_slot(tmp_path):
    res = _residency(tmp_path)
    pool = res.pool
    gate = threading.Event()
    hz = res.entry("z").content_hash

    def hold(h, g):
        gate.wait(30)
        if h == hz:
            raise OSError("copy failed")

    pool.group_gate = hold
    seq = _seq(res, "m", [("x", 1.0), ("z", 0.25)])
    assert res.ready(seq, 3, 0.0, 0.0)[0] is Readiness.NOT_YET
    free_before = len(pool._free_slots)
    mix_handle = pool.handle_of(seq.content_hash)  # taken now: the failure drops the entry
    x_handle = pool.handle_of(res.entry("x").content_hash)
    gate.set()
    with pytest.raises(OSError):
        mix_handle.wait(30)
    x_handle.wait(30)
    assert pool.handle_of(seq.content_hash) is None and pool.handle_of(hz) is None
    assert len(pool._free_slots) == free_before + 2  # the mixture's and z's
    assert pool._entries[res.entry("x").content_hash].refcount == 0
    res.release(seq)  # the sequence's hold went with the mixture: nothing to release twice
    res.close()


def test_adapter_use_limits(tmp_path):
    res = _residency(tmp_path)
    assert res.adapter_use(None, [("x", 1.0)], 4).mixture is None  # one entry at 1: the adapter
    with pytest.raises(InvalidRequestError, match="sums to rank 32"):
        res.adapter_use(None, [("x", 1), ("y", 1), ("z", 1)], 4)  # 8 + 16 + 8 > 24
    with pytest.raises(InvalidRequestError, match="slots"):  # 2 members + itself > 2 slots
        _residency(tmp_path / "small", max_adapters=3).adapter_use(None, [("x", 1), ("z", 2)], 4)
    both = res.adapter_use(None, [("x", 0.25), ("x2", 0.5)], 4)  # one content, two names
    assert [w for _, _, w in both.mixture] == [0.75]
    with pytest.raises(InvalidRequestError, match="only"):
        res.adapter_use("x", [("y", 1.0)], 4)  # a name and a mixture: one or the other
    res.close()
