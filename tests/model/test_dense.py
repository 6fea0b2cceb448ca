"""The dense, differentiable forward (cara_jax/dense.py) with many adapters in one batch:
logits against HF+PEFT, gradients against one adapter at a time, and training with optax.

The tiny random Llama (tests/conftest.py) with real PEFT adapters of different ranks and targets.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from cara_jax.adapters import load_peft_adapter
from cara_jax.adapters.lora_set import LoraSet
from cara_jax.dense import dense_logits, sequence_nll, token_logprobs
from tests.helpers import make_peft_adapters, peft_mixed, rel_err

SPECS = {
    "r8_attn": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "r16_mlp": dict(r=16, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "r4_all": dict(r=4, lora_alpha=4, target_modules="all-linear", use_rslora=True),
}
T = 12


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory, tiny):
    paths = make_peft_adapters(tiny_llama_dir, tmp_path_factory.mktemp("dense"), SPECS, seed=3,
                               scale=4.0)  # fmt: skip
    return paths, [load_peft_adapter(p, tiny.cfg) for p in paths.values()]


def _tokens(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 512, size=(n, T)).astype(np.int32)


def test_dense_logits_match_peft(tiny, hf_tiny, adapters):
    """One batch: base, each of three adapters (ranks 4/8/16, attention/MLP/all targets)."""
    paths, ads = adapters
    s, params = LoraSet.from_adapters(tiny.cfg, ads)
    toks = _tokens(0, 4)
    slots = np.array([0, 1, 2, 3])
    ours = np.asarray(dense_logits(tiny, toks, s.hook(params, slots)))
    peft = peft_mixed(copy.deepcopy(hf_tiny), paths)
    names = [None, *paths]
    for i, name in enumerate(names):
        with torch.no_grad():
            if name is None:
                with peft.disable_adapter():
                    ref = peft(torch.tensor(toks[i : i + 1])).logits[0].numpy()
            else:
                peft.set_adapter(name)
                ref = peft(torch.tensor(toks[i : i + 1])).logits[0].numpy()
        assert rel_err(ours[i], ref) <= 1e-5, name


def test_grad_grouped_equals_one_adapter_at_a_time(tiny, adapters):
    """grad of the summed NLL of a batch over three adapters (two rows each, plus a base row)
    equals, on each adapter's rows, the grad of its own rows' NLL with it alone."""
    _, ads = adapters
    toks = _tokens(1, 7)
    slots = np.array([1, 2, 3, 0, 3, 1, 2])
    mask = jnp.ones((7, T - 1))

    def loss(params, s, toks, slots, mask):
        return jnp.sum(sequence_nll(tiny, toks, mask, s.hook(params, slots)))

    grad = jax.jit(jax.grad(loss), static_argnums=1)  # a LoraSet is a static argument
    s, params = LoraSet.from_adapters(tiny.cfg, ads)
    grads = grad(params, s, toks, slots, mask)
    for k, ad in enumerate(ads):
        mine = np.flatnonzero(slots == k + 1)
        s1, p1 = LoraSet.from_adapters(tiny.cfg, [ad])
        g1 = grad(p1, s1, toks[mine], np.ones(len(mine)), mask[mine])
        for p in s1.projections:
            r = s1.ranks[0][p]
            for ab in ("a", "b"):
                want = np.stack([np.asarray(g)[s1.slot_rows[p][1, :r]] for g in g1[ab][p]])
                got = np.stack([np.asarray(g)[s.slot_rows[p][k + 1, :r]] for g in grads[ab][p]])
                assert np.abs(want).max() > 0
                assert rel_err(got, want) <= 1e-5, (k, p, ab)
    for ab in ("a", "b"):  # the padding row gets nothing
        assert all(not np.asarray(g)[0].any() for v in grads[ab].values() for g in v)


def test_adam_trains_three_adapters_in_one_step(tiny):
    """20 Adam steps, each one jitted step over all three new adapters (rank 8, q/v/down): each
    adapter's NLL on its own text falls, and it ends below the others' on that text."""
    s, params = LoraSet.init(tiny.cfg, 3, 8, ("q_proj", "v_proj", "down_proj"),
                             jax.random.key(0))  # fmt: skip
    toks = _tokens(2, 3)  # adapter k learns text k
    slots = np.array([1, 2, 3])
    mask = jnp.ones((3, T - 1))
    opt = optax.adam(1e-1)
    state = opt.init(params)

    def loss(params):
        return jnp.sum(sequence_nll(tiny, toks, mask, s.hook(params, slots)))

    @jax.jit
    def step(params, state):
        value, g = jax.value_and_grad(loss)(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, value

    def nll_matrix(params):  # [adapter, text]
        grid = np.repeat(toks, 3, axis=0)  # text j for adapters 1..3
        sl = np.tile(np.arange(1, 4), 3)
        lp = token_logprobs(tiny, grid, s.hook(params, sl))
        return -np.asarray(lp.sum(-1)).reshape(3, 3).T

    before = nll_matrix(params)
    np.testing.assert_allclose(before, before[0:1].repeat(3, 0), rtol=1e-6)  # B = 0: the base
    for _ in range(20):
        params, state, _ = step(params, state)
    after = nll_matrix(params)
    for k in range(3):
        # the tiny model's random final norm keeps its logits near uniform (NLL ~ log 512 per
        # token), which bounds how far any adapter can move them: a few nats is real learning
        assert after[k, k] < before[k, k] - 2.0, (k, before[k, k], after[k, k])
        assert after[k, k] < min(after[j, k] for j in range(3) if j != k)
    for ab in ("a", "b"):
        assert all(not np.asarray(g)[0].any() for v in params[ab].values() for g in v)
