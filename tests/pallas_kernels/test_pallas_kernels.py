"""Pallas grouped-LoRA kernels (interpret mode) against their jnp references.

Outputs are poisoned with NaN, so an element a kernel never writes fails the comparison.
Inputs are random (row 0 of each pool is zero by the pool's contract); adapters sit in shuffled,
non-contiguous pool rows and batch rows use them in any order, some rows use none (slot 0).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from cara_jax.adapters import multi_lora
from cara_jax.adapters.device_pool import DevicePool, PoolConfig
from cara_jax.adapters.multi_lora import mbgmv_index, multi_lora_delta, resolve_backend
from cara_jax.adapters.pool_index import rank_bucket_for
from tests.helpers import batch_slots, make_pool
from tests.helpers import rel_err as rel

TOL = {"float32": 1e-5, "bfloat16": 1e-2}


# (din, dout, batch, ranks, dtype): SmolLM2 and Llama-2-7B feature sizes, ranks 8..128
DECODE = [
    (576, 192, 5, [8, 128, 16, 24], "float32"),
    (4096, 4096, 3, [64, 8], "float32"),
    (576, 1536, 7, [16, 32, 8, 64], "bfloat16"),
]


@pytest.mark.parametrize("din,dout,batch,ranks,dtype", DECODE)
def test_bgmv(din, dout, batch, ranks, dtype):
    rng = np.random.default_rng(din + batch)
    p = make_pool(rng, din, dout, ranks, dtype)
    ad = batch_slots(rng, len(ranks) + 1, batch)
    idx = jnp.asarray(p.slot_rows[ad, : rank_bucket_for(p.slot_rank[ad].max())])
    x = jnp.asarray(rng.standard_normal((batch, din)), dtype)
    ref = pk.bgmv_ref(x, p.a, p.b, idx)
    np.testing.assert_array_equal(ref, multi_lora.bgmv(x, p.a, p.b, idx))  # same math
    out = pk.bgmv(x, p.a, p.b, idx, interpret=True, poison=True)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    assert rel(out, ref) <= TOL[dtype]
    assert not np.asarray(out)[ad == 0].any()  # no adapter: exactly zero


@pytest.mark.parametrize("din,dout,batch,ranks,dtype", DECODE)
def test_mbgmv(din, dout, batch, ranks, dtype):
    rng = np.random.default_rng(din + batch + 1)
    p = make_pool(rng, din, dout, ranks, dtype)
    ad = batch_slots(rng, len(ranks) + 1, batch)
    r = p.slot_rank[ad]
    rows, owner = mbgmv_index(jnp.asarray(r), jnp.asarray(p.slot_rows), jnp.asarray(ad),
                              rank_bucket_for(r.sum()))  # fmt: skip
    x = jnp.asarray(rng.standard_normal((batch, din)), dtype)
    ref = pk.mbgmv_ref(x, p.a, p.b, rows, owner)
    np.testing.assert_array_equal(ref, multi_lora.mbgmv(x, p.a, p.b, rows, owner))
    out = pk.mbgmv(x, p.a, p.b, rows, owner, interpret=True, poison=True)
    assert np.isfinite(np.asarray(out)).all()
    assert rel(out, ref) <= TOL[dtype]
    assert not np.asarray(out)[ad == 0].any()


@pytest.mark.parametrize("din,dout,batch,ranks,dtype", DECODE)
def test_mbgmv_blocks(din, dout, batch, ranks, dtype):
    """The engine's layout: each row's rank rows in blocks of RANK_BLOCK (row 0 pads inside a
    row's last block); the blocked jnp form and the Pallas kernel on the flattened blocks both
    equal the flat reference."""
    from cara_jax.adapters.multi_lora import RANK_BLOCK

    rng = np.random.default_rng(din + batch + 2)
    p = make_pool(rng, din, dout, ranks, dtype)
    ad = batch_slots(rng, len(ranks) + 1, batch)
    blk_rows, blk_own = [], []
    for i, s in enumerate(ad):
        r = int(p.slot_rank[s])
        for k in range(0, r, RANK_BLOCK):
            blk = np.zeros(RANK_BLOCK, np.int32)
            take_n = min(RANK_BLOCK, r - k)
            blk[:take_n] = p.slot_rows[s, k : k + take_n]
            blk_rows.append(blk)
            blk_own.append(i)
    blk_rows.append(np.zeros(RANK_BLOCK, np.int32))  # a padding block at the end, owned by 0
    blk_own.append(0)
    br, bo = jnp.asarray(np.stack(blk_rows)), jnp.asarray(blk_own, jnp.int32)
    flat_rows, flat_own = br.reshape(-1), jnp.repeat(bo, RANK_BLOCK)
    x = jnp.asarray(rng.standard_normal((batch, din)), dtype)
    ref = pk.mbgmv_ref(x, p.a, p.b, flat_rows, flat_own)
    blocked = pk.mbgmv_blocks_ref(x, p.a, p.b, br, bo)
    assert rel(blocked, ref) <= TOL[dtype]
    out = pk.mbgmv(x, p.a, p.b, flat_rows, flat_own, interpret=True, poison=True)
    assert rel(out, ref) <= TOL[dtype]
    assert not np.asarray(blocked)[ad == 0].any()


def test_mbgmv_segments_from_owner():
    rows = jnp.array([5, 6, 7, 2, 3, 0, 0, 0], jnp.int32)  # row 2 has two entries, rows 0/3 none
    owner = jnp.array([1, 1, 1, 2, 2, 0, 0, 0], jnp.int32)
    start, count = pk.segments_from_owner(rows, owner, 4)
    assert start.tolist() == [0, 0, 3, 0] and count.tolist() == [0, 3, 2, 0]


# (din, dout, segment sizes, ranks per segment (0 = none), dtype)
PREFILL = [
    (576, 192, [1, 7, 1, 20, 1], [8, 0, 128, 16, 24], "float32"),
    (4096, 4096, [1, 33, 2], [64, 8, 0], "float32"),
    (576, 1536, [3, 1, 0, 17], [16, 32, 8, 0], "bfloat16"),
]


@pytest.mark.parametrize("din,dout,sizes,ranks,dtype", PREFILL)
def test_sgmv(din, dout, sizes, ranks, dtype):
    rng = np.random.default_rng(din + len(sizes))
    p = make_pool(rng, din, dout, [r for r in ranks if r], dtype)
    # segment g uses a shuffled slot; rank 0 -> slot 0
    slots = rng.permutation(np.arange(1, len(p.slot_rank)))
    seg_slot = np.zeros(len(ranks), np.int32)
    seg_slot[[g for g, r in enumerate(ranks) if r]] = slots
    seg_idx = jnp.asarray(p.slot_rows[seg_slot, : rank_bucket_for(max(ranks))])
    gs = jnp.asarray(sizes, jnp.int32)
    x = jnp.asarray(rng.standard_normal((sum(sizes) + 2, din)), dtype)  # 2 tokens past the end
    ref = pk.sgmv_ref(x, p.a, p.b, seg_idx, gs)
    np.testing.assert_array_equal(ref, multi_lora.sgmv(x, p.a, p.b, seg_idx, gs))
    out = pk.sgmv(x, p.a, p.b, seg_idx, gs, interpret=True, poison=True)
    assert np.isfinite(np.asarray(out)).all()
    assert rel(out, ref) <= TOL[dtype]
    assert not np.asarray(out)[sum(sizes) :].any()  # tokens outside every segment


@pytest.mark.parametrize("strategy,t", [("bgmv", 1), ("mbgmv", 1), ("bgmv", 6)])
def test_multi_lora_delta_backends(strategy, t):
    """The functional entry point gives the same deltas with either backend."""
    rng = np.random.default_rng(7 + t)
    ranks = [8, 32, 16, 128]
    p = make_pool(rng, 576, 192, ranks, "float32")
    ad = batch_slots(rng, len(ranks) + 1, 5)
    x = jnp.asarray(rng.standard_normal((5, t, 576)), jnp.float32)
    r = p.slot_rank[ad]
    bucket = rank_bucket_for(r.sum() if strategy == "mbgmv" else r.max())
    args = (x, p.a, p.b, jnp.asarray(p.slot_rows), jnp.asarray(p.slot_rank), jnp.asarray(ad))
    ref = multi_lora_delta(*args, strategy=strategy, rank_bucket=bucket, backend="jnp")
    out = multi_lora_delta(*args, strategy=strategy, rank_bucket=bucket,
                           backend="pallas_interpret")  # fmt: skip
    assert out.shape == ref.shape == (5, t, 192)
    assert rel(out, ref) <= 1e-5


def test_backend_selection():
    assert resolve_backend("auto", 576, 192) == ("pallas" if jax.default_backend() == "gpu"
                                                 else "jnp")  # fmt: skip
    assert resolve_backend("pallas_interpret", 576, 192) == "pallas_interpret"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", 576, 192)
    assert pk.supports(576, 1536, 4096, 11008) and not pk.supports(100)
    with pytest.raises(ValueError, match="divisible"):
        pk.bgmv(jnp.ones((1, 100)), jnp.ones((4, 100)), jnp.ones((4, 64)),
                jnp.zeros((1, 8), jnp.int32), interpret=True)  # fmt: skip


def _triton_calls(fn, *args) -> int:
    """Lower for CUDA on this machine (Pallas -> Triton IR happens in JAX; no GPU needed)."""
    try:
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except Exception as e:  # a jaxlib without GPU lowering support
        if "platform" in str(e).lower() and "cuda" in str(e).lower():
            pytest.skip(f"no CUDA lowering here: {e}")
        raise
    return text.count("xla.gpu.triton")


def test_kernels_lower_to_triton():
    """Catches ops or tile shapes the Triton backend cannot lower, without a GPU."""
    rng = np.random.default_rng(0)
    p = make_pool(rng, 4096, 11008, [64, 16], "bfloat16")
    x = jnp.asarray(rng.standard_normal((3, 4096)), jnp.bfloat16)
    idx = jnp.asarray(p.slot_rows[[1, 0, 2], :64])
    assert _triton_calls(pk.bgmv, x, p.a, p.b, idx) == 2
    rows, owner = mbgmv_index(jnp.asarray(p.slot_rank[[1, 0, 2]]), jnp.asarray(p.slot_rows),
                              jnp.array([1, 0, 2]), 128)  # fmt: skip
    assert _triton_calls(pk.mbgmv, x, p.a, p.b, rows, owner) == 2
    xs = jnp.asarray(rng.standard_normal((40, 4096)), jnp.bfloat16)
    assert _triton_calls(pk.sgmv, xs, p.a, p.b, idx, jnp.array([1, 30, 9], jnp.int32)) == 2


def _smollm2_like(num_layers=1, vocab=512):
    """SmolLM2-135M dimensions (hidden 576, MLP 1536, 9/3 heads), one layer, random weights."""
    from flax import nnx

    from cara_jax.config import ModelConfig
    from cara_jax.model import Llama
    from cara_jax.weights import LoadedModel

    cfg = ModelConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536,
                      num_layers=num_layers, num_heads=9, num_kv_heads=3, head_dim=64,
                      rope_theta=100000.0, tie_word_embeddings=True)  # fmt: skip
    graphdef, state = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
    return LoadedModel(cfg=cfg, graphdef=graphdef, state=state, source=Path(), dtype=jnp.float32)


def _adapter(cfg, name, rank, projs, seed):
    from cara_jax.adapters.peft import LoraAdapter, LoraModule

    rng = np.random.default_rng(seed)
    shapes = cfg.projection_shapes()
    mods = {
        (layer, p): LoraModule(
            a=(rng.standard_normal((shapes[p][0], rank)) / np.sqrt(shapes[p][0])).astype(
                np.float32
            ),
            b=(rng.standard_normal((rank, shapes[p][1])) * 0.05).astype(np.float32),
        )
        for layer in range(cfg.num_layers)
        for p in projs
    }
    return LoraAdapter(path=name, content_hash=name, modules=mods, projection_shapes=shapes)


def test_model_step_through_hook():
    """A SmolLM2-shaped model: logits with the Pallas hook equal those with the jnp hook."""
    from cara_jax.scoring import full_logits

    loaded = _smollm2_like()
    cfg = loaded.cfg
    projs = ("q_proj", "k_proj", "down_proj")  # 576->576, 576->192, 1536->576
    pool = DevicePool(cfg, PoolConfig(budget_bytes=16 << 20, max_rank=64, projections=projs))
    slots = []
    for i, (rank, targets) in enumerate([(8, projs), (32, projs[1:]), (16, projs)]):
        ad = _adapter(cfg, f"ad{i}", rank, targets, seed=i)
        pool.acquire(ad).wait(60)
        slots.append(pool.slot_of(ad.content_hash))
    rows = np.array([slots[2], 0, slots[0], slots[1], slots[2]], np.int32)  # odd batch, a slot 0
    rng = np.random.default_rng(0)
    try:
        # decode with the default strategy, and prefill (mbgmv: test_multi_lora_delta_backends)
        for strategy, t in (("bgmv", 1), ("bgmv", 4)):
            tokens = rng.integers(3, cfg.vocab_size, size=(len(rows), t))
            logits = {}
            for backend in ("jnp", "pallas_interpret"):
                with pool.lock:
                    hook = pool.hook(rows, strategy, backend=backend)
                    logits[backend] = np.asarray(full_logits(loaded, tokens, hook))
            base = np.asarray(full_logits(loaded, tokens, None))
            assert rel(logits["pallas_interpret"], logits["jnp"]) <= 1e-5, (strategy, t)
            changed = np.abs(logits["jnp"] - base).max(axis=(1, 2))
            # adapters move the logits; the slot-0 row only sees float noise of another graph
            assert (changed[rows != 0] > 1e-2).all() and changed[rows == 0].max() < 1e-4
    finally:
        pool.close()


@pytest.mark.parametrize("strategy", ["mbgmv", "bgmv"])
def test_engine_step_pallas_matches_jnp(strategy):
    """The engine's step layout (decode rows and a prefill chunk, adapters of different ranks
    and projections, a base row): the Pallas kernels in the interpreter give the jnp path's
    logits, through the same per-step index tables and rank loops."""
    from cara_jax.engine.runner import ModelRunner, RunnerConfig

    loaded = _smollm2_like()
    cfg = loaded.cfg
    pool = DevicePool(cfg, PoolConfig(budget_bytes=32 << 20, max_rank=64))
    slots = []
    specs = [(8, ("q_proj", "k_proj", "v_proj", "o_proj")), (40, ("k_proj", "down_proj")),
             (16, ("gate_proj", "up_proj", "down_proj"))]  # fmt: skip
    for i, (rank, targets) in enumerate(specs):
        ad = _adapter(cfg, f"st{i}", rank, targets, seed=10 + i)
        pool.acquire(ad).wait(60)
        slots.append(pool.slot_of(ad.content_hash))
    rc = RunnerConfig(num_pages=16, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16,
                      max_prefill_seqs=1, buckets=(16,))  # fmt: skip
    logits = {}
    try:
        for backend in ("jnp", "pallas_interpret"):
            runner = ModelRunner(loaded, rc, pool=pool, lora_strategy=strategy,
                                 lora_backend=backend)  # fmt: skip
            batch = runner.synthetic_batch([slots[2], 0, slots[0], slots[1]], [6], ctx=9,
                                           prompt_slots=[slots[1]])  # fmt: skip
            with pool.lock:
                logits[backend] = np.asarray(runner.run(batch).logits)
        base = ModelRunner(loaded, rc)
        with pool.lock:
            plain = np.asarray(base.run(base.synthetic_batch([0] * 4, [6], ctx=9)).logits)
    finally:
        pool.close()
    assert rel(logits["pallas_interpret"], logits["jnp"]) <= 1e-5
    moved = np.abs(logits["jnp"] - plain).max(axis=1)
    assert (moved[[0, 2, 3, 4]] > 1e-3).all() and moved[1] < 1e-4  # row 1 is a base row


# ---------------------------------------------------------------- bigger sweeps (-m slow)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("din,dout", [(4096, 4096), (576, 1536), (1536, 576), (4096, 1024)])
@pytest.mark.parametrize("batch", [1, 9, 33])
def test_decode_sweep(din, dout, batch, dtype):
    rng = np.random.default_rng(din * 7 + dout + batch)
    ranks = [8, 16, 32, 64, 128, 24, 8]
    p = make_pool(rng, din, dout, ranks, dtype)
    ad = batch_slots(rng, len(ranks) + 1, batch)
    r = p.slot_rank[ad]
    x = jnp.asarray(rng.standard_normal((batch, din)), dtype)
    idx = jnp.asarray(p.slot_rows[ad, : rank_bucket_for(r.max())])
    out = pk.bgmv(x, p.a, p.b, idx, interpret=True, poison=True)
    assert rel(out, pk.bgmv_ref(x, p.a, p.b, idx)) <= TOL[dtype]
    rows, owner = mbgmv_index(jnp.asarray(r), jnp.asarray(p.slot_rows), jnp.asarray(ad),
                              rank_bucket_for(r.sum()))  # fmt: skip
    out = pk.mbgmv(x, p.a, p.b, rows, owner, interpret=True, poison=True)
    assert rel(out, pk.mbgmv_ref(x, p.a, p.b, rows, owner)) <= TOL[dtype]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rank", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("sizes", [[1] * 9, [64, 1, 100], [0, 5, 0, 130, 1]])
def test_prefill_sweep(sizes, rank, dtype):
    rng = np.random.default_rng(rank + len(sizes))
    p = make_pool(rng, 4096, 4096, [rank] * len(sizes), dtype)
    seg_slot = rng.permutation(np.arange(1, len(sizes) + 1))
    seg_slot[0] = 0
    seg_idx = jnp.asarray(p.slot_rows[seg_slot, : rank_bucket_for(rank)])
    gs = jnp.asarray(sizes, jnp.int32)
    x = jnp.asarray(rng.standard_normal((sum(sizes), 4096)), dtype)
    out = pk.sgmv(x, p.a, p.b, seg_idx, gs, interpret=True, poison=True)
    assert rel(out, pk.sgmv_ref(x, p.a, p.b, seg_idx, gs)) <= TOL[dtype]
