"""PEFT folder parsing: per-module deltas equal PEFT's own, typed refusals, content identity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from cara_jax.adapters.peft import (
    AdapterShapeError,
    AdapterWarning,
    AdapterWeightsError,
    UnsupportedAdapterError,
    load_peft_adapter,
    module_name,
)
from cara_jax.lora_hooks import PROJECTIONS
from tests.conftest import rel_err
from tests.test_multi_lora_parity import ALL7, make_peft_adapters

SPECS = {
    "r8": dict(r=8, lora_alpha=8, target_modules=ALL7),
    "rslora": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=ALL7),
    "qv": dict(r=64, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "alllinear": dict(r=4, lora_alpha=32, target_modules="all-linear"),
    "regex": dict(r=8, lora_alpha=16, target_modules=r".*\.(1|2)\.mlp\.(up|down)_proj"),
    "patterns": dict(
        r=8, lora_alpha=16, target_modules=ALL7,
        rank_pattern={"k_proj": 4, "model.layers.2.mlp.up_proj": 12}, alpha_pattern={"o_proj": 3},
    ),
    "layers": dict(r=8, lora_alpha=8, target_modules=ALL7, layers_to_transform=[0, 2]),
}  # fmt: skip


@pytest.fixture(scope="module")
def saved(tiny_llama_dir, tmp_path_factory):
    return make_peft_adapters(tiny_llama_dir, tmp_path_factory.mktemp("peft"), SPECS)


@pytest.mark.parametrize("name", list(SPECS))
def test_deltas_equal_peft_modules(name, saved, tiny, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, saved[name]).eval()
    ours = load_peft_adapter(saved[name], tiny.cfg)
    modules = dict(peft_model.base_model.model.named_modules())
    rng = np.random.default_rng(0)
    n_targeted = 0
    for layer in range(tiny.cfg.num_layers):
        for proj in PROJECTIONS:
            mod = modules[module_name(layer, proj)]
            din = tiny.cfg.projection_shapes()[proj][0]
            x = rng.standard_normal((5, din)).astype(np.float32)
            is_lora = hasattr(mod, "lora_A") and "default" in mod.lora_A
            assert ((layer, proj) in ours.modules) == is_lora, (layer, proj)
            if not is_lora:
                continue
            n_targeted += 1
            with torch.no_grad():
                xt = torch.from_numpy(x)
                ref = (mod(xt) - mod.base_layer(xt)).numpy()
            assert rel_err(ours.delta(layer, proj, x), ref) <= 1e-5
            assert ours.modules[(layer, proj)].rank == mod.r["default"]
    assert n_targeted > 0


def test_content_hash(saved, tiny, tmp_path):
    a = load_peft_adapter(saved["r8"], tiny.cfg)
    copy = tmp_path / "copy"
    shutil.copytree(saved["r8"], copy)
    assert load_peft_adapter(copy, tiny.cfg).content_hash == a.content_hash
    t = load_file(str(copy / "adapter_model.safetensors"))
    k = next(iter(t))
    t[k] = t[k] + 1e-3
    save_file(t, str(copy / "adapter_model.safetensors"))
    assert load_peft_adapter(copy, tiny.cfg).content_hash != a.content_hash
    assert load_peft_adapter(saved["qv"], tiny.cfg).content_hash != a.content_hash


def _broken(saved, tmp_path, name="r8", conf=None, tensors=None):
    d = tmp_path / "broken"
    shutil.copytree(saved[name], d)
    if conf:
        c = json.loads((d / "adapter_config.json").read_text())
        c.update(conf)
        (d / "adapter_config.json").write_text(json.dumps(c))
    if tensors:
        t = load_file(str(d / "adapter_model.safetensors"))
        tensors(t)
        save_file(t, str(d / "adapter_model.safetensors"))
    return d


def _first_a(t):
    return next(k for k in t if "lora_A" in k)


@pytest.mark.parametrize(
    "conf,tensors,error",
    [
        (dict(use_dora=True), None, UnsupportedAdapterError),
        (dict(modules_to_save=["lm_head"]), None, UnsupportedAdapterError),
        (dict(bias="all"), None, UnsupportedAdapterError),
        (dict(target_modules=["lm_head"]), None, UnsupportedAdapterError),
        (dict(target_modules=["embed_tokens", "q_proj"]), None, UnsupportedAdapterError),
        (dict(target_modules=["c_attn"]), None, UnsupportedAdapterError),
        (dict(peft_type="IA3"), None, UnsupportedAdapterError),
        (dict(r=4), None, AdapterShapeError),  # config rank disagrees with the tensors
        (None, lambda t: t.update({_first_a(t): np.full_like(t[_first_a(t)], np.nan)}), AdapterWeightsError),
        (None, lambda t: t.update({_first_a(t): np.zeros((8, 99), np.float32)}), AdapterShapeError),
        (None, lambda t: t.pop(_first_a(t)), AdapterWeightsError),
        (None, lambda t: t.update({"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": np.zeros((8, 64), np.float32)}), AdapterShapeError),
        (None, lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((8, 512), np.float32)}), UnsupportedAdapterError),
    ],
)  # fmt: skip
def test_refusals(saved, tiny, tmp_path, conf, tensors, error):
    d = _broken(saved, tmp_path, conf=conf, tensors=tensors)
    with pytest.raises(error):
        load_peft_adapter(d, tiny.cfg)


def test_pickle_only_is_refused_without_unpickling(saved, tiny, tmp_path):
    d = _broken(saved, tmp_path)
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsupportedAdapterError, match="pickle"):
        load_peft_adapter(d, tiny.cfg)


def test_missing_files(tiny, tmp_path):
    with pytest.raises(AdapterWeightsError):
        load_peft_adapter(tmp_path, tiny.cfg)


def test_base_model_mismatch_warns_and_fan_in_fan_out(saved, tiny, tmp_path):
    d = _broken(
        saved, tmp_path, conf=dict(base_model_name_or_path="other/model", fan_in_fan_out=True)
    )
    with pytest.warns(AdapterWarning) as rec:
        a = load_peft_adapter(d, tiny.cfg, base_model_name="my/model")
    msgs = " ".join(str(w.message) for w in rec)
    assert "other/model" in msgs and "fan_in_fan_out" in msgs
    assert a.modules  # still loaded
