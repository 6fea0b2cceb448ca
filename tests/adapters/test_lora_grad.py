"""Gradients of the grouped-LoRA op (lora_op.multi_lora_delta) against a per-adapter dense loop.

The op is differentiable in (x, A, B) on every backend (its custom VJP runs the backward on the
forward's kernels), under vmap at T > 1, and under a 2-device mesh with Explicit axes.
Batches mix ranks 4/8/16 with base rows (slot 0); the loss is a random projection of the delta.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cara_jax.adapters.lora_op import multi_lora_delta
from cara_jax.adapters.pool_index import rank_bucket_for
from tests.helpers import make_pool, rel_err

RANKS = [4, 8, 16]
DIN, DOUT = 64, 48
ADAPTER = np.array([2, 0, 1, 3, 2, 0], np.int32)  # slots: ranks 8, base, 4, 16, 8, base
TOL = {"float32": 1e-5, "bfloat16": 1e-2}
ROOT = Path(__file__).resolve().parents[2]


def dense_loop(x, a, b, slot_rows, slot_rank, adapter):
    """Per adapter: its rows as dense A [r, in] and B [r, out], applied to the batch rows on it."""
    out = jnp.zeros((*x.shape[:-1], b.shape[1]), jnp.float32)
    for s in sorted(set(adapter.tolist()) - {0}):
        rows = slot_rows[s, : slot_rank[s]]
        on = np.flatnonzero(adapter == s)
        d = x[on].astype(jnp.float32) @ a[rows].T.astype(jnp.float32) @ b[rows].astype(jnp.float32)
        out = out.at[on].set(d)
    return out


def _case(seed, t, dtype):
    rng = np.random.default_rng(seed)
    p = make_pool(rng, DIN, DOUT, RANKS, dtype, cap=32)
    x = jnp.asarray(rng.standard_normal((len(ADAPTER), t, DIN)), dtype)
    w = jnp.asarray(rng.standard_normal((len(ADAPTER), t, DOUT)), jnp.float32)
    return p, x, w


def _bucket(p, strategy, t):
    r = p.slot_rank[ADAPTER]
    return rank_bucket_for(int(r.sum() if strategy == "mbgmv" and t == 1 else r.max()))


def _grads(p, x, w, strategy, t, backend):
    tables = (jnp.asarray(p.slot_rows), jnp.asarray(p.slot_rank), jnp.asarray(ADAPTER))

    def op_loss(x, a, b):
        d = multi_lora_delta(x, a, b, *tables, strategy=strategy, rank_bucket=_bucket(p, strategy, t),
                             backend=backend)  # fmt: skip
        return jnp.sum(w * d.astype(jnp.float32))

    def ref_loss(x, a, b):
        return jnp.sum(w * dense_loop(x, a, b, p.slot_rows, p.slot_rank, ADAPTER))

    got = jax.jit(jax.grad(op_loss, argnums=(0, 1, 2)))(x, p.a, p.b)
    want = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(x, p.a, p.b)
    return got, want


@pytest.mark.parametrize("backend", ["jnp", "pallas_interpret"])
@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("strategy", ["bgmv", "mbgmv"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grad_matches_dense_loop(backend, t, strategy, dtype):
    p, x, w = _case(t + len(strategy), t, dtype)
    got, want = _grads(p, x, w, strategy, t, backend)
    for name, g, r in zip(("dx", "dA", "dB"), got, want, strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert rel_err(g, r) <= TOL[dtype], name
    # row 0 pads every unused rank position: it gets no gradient, so training keeps it zero
    assert not np.asarray(got[1][0], np.float32).any() and not np.asarray(got[2][0], np.float32).any()
    # rows of no adapter in the batch get none either; every used row gets some
    used = np.unique(np.concatenate([p.slot_rows[s, : p.slot_rank[s]] for s in set(ADAPTER) - {0}]))
    touched = np.flatnonzero(np.abs(np.asarray(got[1], np.float32)).sum(axis=1))
    np.testing.assert_array_equal(touched, used)


@pytest.mark.parametrize("backend", ["jnp", "pallas_interpret"])
def test_vmap_grad_over_two_pools(backend):
    """vmap(grad) at T = 5 over two stacked pools (two sets of adapters, one batch of tokens)."""
    t = 5
    p, x, w = _case(11, t, "float32")
    rng = np.random.default_rng(12)
    a2 = jnp.stack([p.a, jnp.asarray(rng.standard_normal(p.a.shape), jnp.float32).at[0].set(0)])
    b2 = jnp.stack([p.b, jnp.asarray(rng.standard_normal(p.b.shape), jnp.float32).at[0].set(0)])
    tables = (jnp.asarray(p.slot_rows), jnp.asarray(p.slot_rank), jnp.asarray(ADAPTER))

    def op_loss(x, a, b):
        d = multi_lora_delta(x, a, b, *tables, strategy="bgmv", rank_bucket=16, backend=backend)
        return jnp.sum(w * d)

    def ref_loss(x, a, b):
        return jnp.sum(w * dense_loop(x, a, b, p.slot_rows, p.slot_rank, ADAPTER))

    got = jax.jit(jax.vmap(jax.grad(op_loss, argnums=(0, 1, 2)), in_axes=(None, 0, 0)))(x, a2, b2)
    want = jax.vmap(jax.grad(ref_loss, argnums=(0, 1, 2)), in_axes=(None, 0, 0))(x, a2, b2)
    for g, r in zip(got, want, strict=True):
        assert g.shape[0] == 2 and rel_err(g, r) <= 1e-5


def _split_grads(mesh, p, x, w, strategy, t, backend):
    """grad of the op's loss with x, w and the slots split over the mesh's "data" axis."""
    from jax.sharding import NamedSharding, PartitionSpec

    split = NamedSharding(mesh, PartitionSpec("data"))
    xs, ws, ad = (jax.device_put(v, split) for v in (x, w, ADAPTER))
    tables = (jnp.asarray(p.slot_rows), jnp.asarray(p.slot_rank))

    def op_loss(x, a, b, w, ad):
        d = multi_lora_delta(x, a, b, *tables, ad, strategy=strategy,
                             rank_bucket=_bucket(p, strategy, t), backend=backend)  # fmt: skip
        return jnp.sum(w * d)

    with jax.set_mesh(mesh):
        got = jax.jit(jax.grad(op_loss, argnums=(0, 1, 2)))(xs, p.a, p.b, ws, ad)
    return got


def mesh_check() -> None:
    """Run in a process with 2 host devices: grads with the batch split over an Explicit axis
    (every backend, T and strategy; one case over an Auto axis) equal the unsplit dense loop;
    prints {case: max rel err}."""
    from jax.sharding import AxisType

    assert jax.device_count() == 2
    cases = [(AxisType.Explicit, backend, t, strategy) for backend in ("jnp", "pallas_interpret")
             for t in (1, 5) for strategy in ("bgmv", "mbgmv")]  # fmt: skip
    cases.append((AxisType.Auto, "jnp", 5, "bgmv"))
    errs = {}
    for kind, backend, t, strategy in cases:
        mesh = jax.make_mesh((2,), ("data",), axis_types=(kind,))
        p, x, w = _case(t + len(strategy), t, "float32")
        want = jax.grad(
            lambda x, a, b, p=p, w=w: jnp.sum(w * dense_loop(x, a, b, p.slot_rows, p.slot_rank,
                                                             ADAPTER)),
            argnums=(0, 1, 2),
        )(x, p.a, p.b)  # fmt: skip
        got = _split_grads(mesh, p, x, w, strategy, t, backend)
        if kind == AxisType.Explicit:  # dx stays split like x
            assert got[0].sharding.spec[0] == "data"
        key = f"{kind.name}/{backend}/t{t}/{strategy}"
        errs[key] = max(rel_err(g, r) for g, r in zip(got, want, strict=True))
    print(json.dumps(errs))


def test_grad_under_two_device_mesh():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")  # fmt: skip
    code = "from tests.adapters.test_lora_grad import mesh_check; mesh_check()"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    errs = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(errs) == 9
    assert max(errs.values()) <= 1e-5, errs
