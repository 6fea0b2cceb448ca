"""Adapters as pytrees without a model: the three accepted layouts read the same adapter,
save_peft_adapter round-trips through cara-jax's PEFT loader, bad trees are clear errors, and
the registry keeps an in-memory adapter exactly as long as a name points at it."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from cara_jax.adapters import (
    AdapterShapeError,
    AdapterWeightsError,
    LoraSet,
    adapter_from_tree,
    adapter_tree,
    load_peft_adapter,
    save_peft_adapter,
)
from cara_jax.adapters.store import AdapterRegistry, HostStore
from tests.helpers import TINY_CFG as CFG


def _factors(seed=0, rank=4):
    rng = np.random.default_rng(seed)
    shapes = CFG.projection_shapes()
    return {(layer, p): (rng.standard_normal((shapes[p][0], rank)).astype(np.float32),
                         rng.standard_normal((rank, shapes[p][1])).astype(np.float32))
            for layer in range(CFG.num_layers) for p in ("q_proj", "down_proj")}  # fmt: skip


def _parent(p):
    return "self_attn" if p.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"


def test_nnx_qwix_and_peft_keyed_trees_read_the_same_adapter(tmp_path):
    f = _factors()
    nnx_like: dict = {"layers": {}}
    qwix_like: dict = {"model": {"layers": {}}}
    for (i, p), (a, b) in f.items():
        nnx_like["layers"].setdefault(i, {}).setdefault(_parent(p), {})[p] = {
            "lora_a": a, "lora_b": b}  # fmt: skip
        qwix_like["model"]["layers"].setdefault(str(i), {})[p] = {
            "kernel_lora_a": a, "kernel_lora_b": b}  # fmt: skip
    peft_keyed = {}
    for (i, p), (a, b) in f.items():
        key = f"base_model.model.model.layers.{i}.{_parent(p)}.{p}"
        peft_keyed[f"{key}.lora_A.weight"] = a.T * 1.0  # PEFT layout: A [r, in], B [out, r]
        peft_keyed[f"{key}.lora_B.weight"] = b.T * 1.0
    ads = [adapter_from_tree(t, CFG, alpha=8.0) for t in (nnx_like, qwix_like, peft_keyed)]
    for ad in ads:
        assert set(ad.modules) == set(f) and ad.content_hash == ads[0].content_hash
        for key, (a, b) in f.items():
            np.testing.assert_array_equal(ad.modules[key].a, a)
            np.testing.assert_allclose(ad.modules[key].b, b * 2.0, rtol=1e-6)  # alpha 8 / r 4
    # back out as a tree, and through a PEFT folder, unchanged
    again = adapter_from_tree(adapter_tree(ads[0]), CFG)
    assert again.content_hash == ads[0].content_hash
    folder = save_peft_adapter(nnx_like, tmp_path / "saved", CFG, alpha=8.0)
    conf = json.loads((folder / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == conf["lora_alpha"] == 4
    loaded = load_peft_adapter(folder, CFG)
    for key in f:
        np.testing.assert_allclose(loaded.modules[key].a, ads[0].modules[key].a, rtol=1e-6)
        np.testing.assert_allclose(loaded.modules[key].b, ads[0].modules[key].b, rtol=1e-6)


def test_path_map_and_mixed_ranks_survive_a_save(tmp_path):
    rng = np.random.default_rng(1)
    tree = {"blocks_0_attn_q": {"lora_a": rng.standard_normal((32, 8)).astype(np.float32),
                                "lora_b": rng.standard_normal((8, 32)).astype(np.float32)},
            "blocks_1_mlp_down": {"lora_a": rng.standard_normal((64, 2)).astype(np.float32),
                                  "lora_b": rng.standard_normal((2, 32)).astype(np.float32)}}  # fmt: skip
    names = {"attn_q": "q_proj", "mlp_down": "down_proj"}

    def path_map(path):
        head = path.split("/")[0].split("_")
        return int(head[1]), names["_".join(head[2:])]

    ad = adapter_from_tree(tree, CFG, path_map=path_map)
    assert {k: m.rank for k, m in ad.modules.items()} == {(0, "q_proj"): 8, (1, "down_proj"): 2}
    back = load_peft_adapter(save_peft_adapter(ad, tmp_path / "mixed"), CFG)
    assert {k: m.rank for k, m in back.modules.items()} == {(0, "q_proj"): 8, (1, "down_proj"): 2}
    # a LoraSet of both: slot rows on each projection at that adapter's own rank
    s, params = LoraSet.from_adapters(CFG, [ad, back])
    assert s.slot_rank["q_proj"].tolist() == [0, 8, 8]
    assert s.slot_rank["down_proj"].tolist() == [0, 2, 2]
    for k in range(2):
        out = s.adapter(params, k)
        np.testing.assert_allclose(out.modules[(0, "q_proj")].b, ad.modules[(0, "q_proj")].b,
                                   rtol=1e-6)  # fmt: skip


def test_bad_trees_are_clear_errors():
    f = _factors()
    (a, b) = f[(0, "q_proj")]
    with pytest.raises(AdapterWeightsError, match="no LoRA factors"):
        adapter_from_tree({"layers": {0: {"q_proj": {"kernel": a}}}}, CFG)
    with pytest.raises(AdapterWeightsError, match="lora_b missing"):
        adapter_from_tree({"layers": {0: {"q_proj": {"lora_a": a}}}}, CFG)
    with pytest.raises(AdapterShapeError, match="do not fit"):
        adapter_from_tree({"layers": {0: {"q_proj": {"lora_a": a.T, "lora_b": b}}}}, CFG)
    with pytest.raises(AdapterShapeError, match="layer 7"):
        adapter_from_tree({"layers": {7: {"q_proj": {"lora_a": a, "lora_b": b}}}}, CFG)
    bad = a.copy()
    bad[0, 0] = np.nan
    with pytest.raises(AdapterWeightsError, match="NaN"):
        adapter_from_tree({"layers": {0: {"q_proj": {"lora_a": bad, "lora_b": b}}}}, CFG)


def test_registry_keeps_memory_adapters_while_named():
    reg = AdapterRegistry(CFG, HostStore(budget_bytes=1))  # the host tier keeps only the newest
    trees = [{"layers": {0: {"q_proj": {"lora_a": a, "lora_b": b}}}}
             for a, b in (_factors(s)[(0, "q_proj")] for s in (1, 2, 3))]  # fmt: skip
    ads = [adapter_from_tree(t, CFG) for t in trees]
    reg.register("x", ads[0])
    reg.register("y", ads[1])  # evicts x's content from the host tier
    assert reg.resolve("x").content_hash == ads[0].content_hash  # from the registry's copy
    assert reg.entry("x").path == ""
    reg.register("x", ads[2])  # replaced: the old content is no longer held
    assert reg.resolve("x").content_hash == ads[2].content_hash
    assert ads[0].content_hash not in reg._memory
    reg.unregister("y")
    assert set(reg._memory) == {ads[2].content_hash}


def test_unservable_leaves_and_unmapped_factors_are_refused():
    from cara_jax.adapters import UnsupportedAdapterError

    a, b = _factors()[(0, "q_proj")]
    ok = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a.T,
          "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b.T}  # fmt: skip
    for extra in ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                  "base_model.model.lm_head.lora_A.weight",
                  "base_model.model.model.embed_tokens.lora_embedding_A"):  # fmt: skip
        with pytest.raises(UnsupportedAdapterError):
            adapter_from_tree({**ok, extra: np.ones((4,), np.float32)}, CFG)
    with pytest.raises(AdapterShapeError, match="path map"):
        adapter_from_tree({"blocks": {"q": {"lora_a": a, "lora_b": b}}}, CFG)
    # a LoraAdapter given as weights is validated and hashed again, not trusted
    from dataclasses import replace

    from cara_jax.adapters.trees import adapter_source

    good = adapter_from_tree(ok, CFG)
    forged = replace(good, content_hash="")
    assert adapter_source(CFG, "x", None, forged, None, None).content_hash == good.content_hash


def test_lora_set_exports_only_the_modules_an_adapter_has():
    a, b = _factors(rank=4)[(0, "q_proj")]
    a2, b2 = _factors(seed=5, rank=2)[(1, "down_proj")]
    ad = adapter_from_tree({"layers": {0: {"q_proj": {"lora_a": a, "lora_b": b}},
                                       1: {"down_proj": {"lora_a": a2, "lora_b": b2}}}}, CFG)  # fmt: skip
    wide = adapter_from_tree({"layers": {i: {"q_proj": {"lora_a": np.ones((32, 8), np.float32),
                                                        "lora_b": np.ones((8, 32), np.float32)}}
                                         for i in range(2)}}, CFG)  # fmt: skip
    s, params = LoraSet.from_adapters(CFG, [ad, wide])
    assert s.adapter(params, 0).content_hash == ad.content_hash
    assert s.adapter(params, 1).content_hash == wide.content_hash
    with pytest.raises(ValueError, match="unknown projections"):
        LoraSet.init(CFG, 2, 4, ("q", "v"), jax.random.key(0))
