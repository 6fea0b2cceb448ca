"""DoRA adapters (PEFT ``use_dora``): loaded with their magnitudes, packed, and served by the
engine step in mixed batches, against PEFT's own DoRA forward."""

from __future__ import annotations

import numpy as np
import pytest

from cara_jax.adapters.peft import load_peft_adapter
from cara_jax.sampling_params import InvalidRequestError
from tests.helpers import (
    ALL7,
    check_rows_against_peft,
    make_dora_adapters,
    make_peft_adapters,
    mixed_prompts,
    packed_round_trip,
    peft_reference,
    pool_after_idle_loads,
)

DORA = {
    "d8_attn": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "d16_all": dict(r=16, lora_alpha=8, target_modules=ALL7),
}
PLAIN = {"p8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])}


@pytest.fixture(scope="module")
def dora_paths(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dora")
    paths = make_dora_adapters(tiny_llama_dir, out, DORA, seed=21)
    paths.update(make_peft_adapters(tiny_llama_dir, out, PLAIN, seed=23))
    return paths


def test_loader_reads_the_magnitudes(dora_paths, tiny):
    from safetensors.numpy import load_file

    ad = load_peft_adapter(dora_paths["d8_attn"], tiny.cfg)
    assert ad.dora and not load_peft_adapter(dora_paths["p8"], tiny.cfg).dora
    saved = load_file(dora_paths["d8_attn"] / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"
    np.testing.assert_array_equal(ad.modules[(1, "v_proj")].m, saved[key])
    assert {p for _, p in ad.modules} == set(DORA["d8_attn"]["target_modules"])


def test_packed_copy_keeps_the_magnitudes(dora_paths, tiny, tmp_path):
    ad = load_peft_adapter(dora_paths["d16_all"], tiny.cfg)
    again = packed_round_trip(tiny.cfg, ad, tmp_path)
    assert again.dora_layers == {p: list(range(tiny.cfg.num_layers)) for p in ALL7}
    for (layer, p), m in ad.modules.items():
        np.testing.assert_array_equal(again.magnitudes[p][layer], m.m)


# (PEFT adapter name, the engine's row: adapter name, mixture or None for the base model)
ROWS = [
    ("d8_attn", "d8_attn"), ("__base__", None), ("p8", "p8"), ("d16_all", "d16_all"),
    ("d8_half", [("d8_attn", 0.5)]), ("d16_zero", [("d16_all", 0.0)]),
    ("dmix", [("d8_attn", 0.7), ("d16_all", -0.4)]), ("d8_attn", "d8_attn"),
]  # fmt: skip


@pytest.mark.parametrize("strategy", ["mbgmv", "bgmv"])
def test_dora_rows_match_peft_in_a_mixed_batch(tiny, tiny_llama_dir, dora_paths, strategy):
    """DoRA adapters of ranks 8 (attention) and 16 (attention and MLP), one at scales 0.5 and 0,
    and a mixture of the two, in one batch with a plain adapter and base rows (decode, chunked
    prefill, prefix-cached prefill): greedy tokens equal PEFT's, top-5 log-probs within 1e-5."""
    # a DoRA adapter at scale s as a copy with B scaled by s; the mixture as PEFT's cat merge
    model = peft_reference(tiny_llama_dir, dora_paths, ["d8_attn", "d16_all", "p8"],
                           scaled=[("d8_half", "d8_attn", 0.5), ("d16_zero", "d16_all", 0.0)],
                           mixes=[("dmix", [("d8_attn", 0.7), ("d16_all", -0.4)])])  # fmt: skip
    prompts = mixed_prompts(np.random.default_rng(9), tiny.cfg.vocab_size,
                            [40, 9, 23, 40, 17, 33, 40, 12])  # fmt: skip
    outs = check_rows_against_peft(tiny, dora_paths, model, ROWS, prompts, 10, strategy)
    assert len(outs) >= 6  # the rows differ: DoRA's parts all show


def test_dora_refusals(tiny, dora_paths):
    from cara_jax.engine import Engine, EngineConfig
    from tests.helpers import IdsTokenizer

    eng = Engine(tiny, IdsTokenizer(), EngineConfig(max_num_seqs=2, max_model_len=64,
                                                    kv_cache_memory=1 << 20))  # fmt: skip
    try:
        for name in ("d8_attn", "p8"):
            eng.load_adapter(name, dora_paths[name])
        with pytest.raises(InvalidRequestError, match="DoRA and plain") as info:
            eng.add_request([1, 2, 3], lora=[("d8_attn", 0.5), ("p8", 0.5)])
        assert info.value.param == "lora"
    finally:
        eng.close()


def test_a_dora_slot_evicts_only_a_dora_holder(tiny, dora_paths):
    """With every DoRA row taken by idle adapters, a new DoRA adapter drops one of those, not
    the idle plain adapters (which a DoRA row could not come from)."""
    from cara_jax.adapters.device_pool import PoolConfig

    pool, ads = pool_after_idle_loads(tiny.cfg, dora_paths, ("p8", "d8_attn", "d16_all"),
                                      PoolConfig(budget_bytes=8 << 20, dora_slots=1))  # fmt: skip
    try:
        resident = set(pool.resident())
        assert ads["p8"].content_hash in resident and ads["d16_all"].content_hash in resident
        assert ads["d8_attn"].content_hash not in resident
        assert pool.stats.evictions == 1
    finally:
        pool.close()


def test_token_rows_put_each_rows_value_on_its_tokens():
    """The step's per-token DoRA rows: a decode row's on its one token, a chunk row's on its
    tokens; padding (index T) places nothing and reads 0."""
    from cara_jax.adapters.pool_index import token_rows

    t = 8
    dec_tok = np.array([5, t], np.int32)  # one decode row, one padding row
    ch_tok = np.array([[0, 1, 2, t], [3, 4, t, t]], np.int32)  # chunks of 3 and 2 tokens
    got = token_rows(t, dec_tok, ch_tok, np.array([2, 9]), np.array([1, 3]))
    np.testing.assert_array_equal(got, [1, 1, 1, 3, 3, 2, 0, 0])
