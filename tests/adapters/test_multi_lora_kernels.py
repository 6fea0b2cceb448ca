"""Reference multi-LoRA kernels against a per-row numpy loop."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cara_jax.adapters.multi_lora import multi_lora_delta
from cara_jax.adapters.pool_index import rank_bucket_for
from tests.helpers import make_pool


def _pool(rng, din, dout, ranks):
    """Random pool (tests.helpers.make_pool) as numpy arrays: (a, b, slot_rows, slot_rank)."""
    p = make_pool(rng, din, dout, ranks, "float32")
    return np.asarray(p.a), np.asarray(p.b), p.slot_rows, p.slot_rank


def _ref(x, a, b, slot_rows, slot_rank, adapter):
    out = np.zeros((*x.shape[:-1], b.shape[1]), np.float64)
    for i, s in enumerate(adapter):
        rows = slot_rows[s, : slot_rank[s]]
        out[i] = x[i].astype(np.float64) @ a[rows].T.astype(np.float64) @ b[rows].astype(np.float64)
    return out


@pytest.mark.parametrize("din,dout", [(576, 192), (576, 1536), (4096, 4096)])
@pytest.mark.parametrize("batch", [1, 5, 13])
def test_decode_strategies_match_reference(din, dout, batch):
    rng = np.random.default_rng(din + batch)
    ranks = [8, 16, 32, 64, 128, 8, 24]
    a, b, slot_rows, slot_rank = _pool(rng, din, dout, ranks)
    adapter = rng.integers(0, len(ranks) + 1, size=batch).astype(np.int32)  # 0 = no adapter
    adapter[0] = 0 if batch > 1 else adapter[0]
    x = rng.standard_normal((batch, 1, din)).astype(np.float32)
    ref = _ref(x, a, b, slot_rows, slot_rank, adapter)
    args = [jnp.asarray(v) for v in (x, a, b, slot_rows, slot_rank, adapter)]
    r = slot_rank[adapter]
    outs = {}
    for strategy, bucket in (
        ("bgmv", rank_bucket_for(r.max())),
        ("mbgmv", rank_bucket_for(r.sum())),
    ):
        out = np.asarray(multi_lora_delta(*args, strategy=strategy, rank_bucket=bucket))
        assert out.shape == ref.shape
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3 * np.abs(ref).max())
        outs[strategy] = out
    np.testing.assert_allclose(
        outs["bgmv"], outs["mbgmv"], rtol=1e-4, atol=1e-4 * np.abs(ref).max()
    )


@pytest.mark.parametrize("seq", [1, 7, 33])
def test_prefill_segments_match_reference(seq):
    rng = np.random.default_rng(seq)
    din, dout = 576, 960
    ranks = [8, 64, 16]
    a, b, slot_rows, slot_rank = _pool(rng, din, dout, ranks)
    adapter = np.array([2, 0, 1, 3, 2], np.int32)
    x = rng.standard_normal((len(adapter), seq, din)).astype(np.float32)
    ref = _ref(x, a, b, slot_rows, slot_rank, adapter)
    args = [jnp.asarray(v) for v in (x, a, b, slot_rows, slot_rank, adapter)]
    out = np.asarray(multi_lora_delta(*args, strategy="bgmv", rank_bucket=64))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3 * np.abs(ref).max())
    assert not out[1].any()  # the row without an adapter gets exactly zero


def test_bfloat16_pool():
    rng = np.random.default_rng(3)
    a, b, slot_rows, slot_rank = _pool(rng, 576, 576, [16, 32])
    adapter = np.array([1, 2, 0], np.int32)
    x = rng.standard_normal((3, 1, 576)).astype(np.float32)
    ref = _ref(x, a, b, slot_rows, slot_rank, adapter)
    args = [jnp.asarray(v, jnp.bfloat16) for v in (x, a, b)] + [
        jnp.asarray(v) for v in (slot_rows, slot_rank, adapter)
    ]
    for strategy, bucket in (("bgmv", 32), ("mbgmv", 64)):
        out = np.asarray(multi_lora_delta(*args, strategy=strategy, rank_bucket=bucket), np.float32)
        assert rel(out, ref) < 2e-2


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_unknown_strategy():
    z = jnp.zeros((1, 1, 4))
    with pytest.raises(ValueError, match="strategy"):
        multi_lora_delta(z, jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.zeros((2, 8), jnp.int32),
                         jnp.zeros((2,), jnp.int32), jnp.zeros((1,), jnp.int32), strategy="x", rank_bucket=8)  # fmt: skip
