"""PEFT LoRA loader: per-module parity with real PEFT, content identity, typed refusals."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cara_jax.adapters import (
    AdapterShapeError,
    AdapterWarning,
    AdapterWeightsError,
    UnsupportedAdapterError,
    load_peft_adapter,
)
from cara_jax.adapters.peft import module_name
from cara_jax.config import ModelConfig
from tests.helpers import ALL7, rel_err

# name -> LoraConfig kwargs
SPECS = {
    "r8": dict(r=8, lora_alpha=16, target_modules=ALL7),
    "r64_qv": dict(r=64, lora_alpha=24, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=ALL7),
    "all_linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "regex": dict(
        r=8, lora_alpha=8, target_modules=r"model\.layers\.[02]\.(self_attn\.k|mlp\.down)_proj"
    ),
    "patterns": dict(
        r=8,
        lora_alpha=8,
        use_rslora=True,
        target_modules=ALL7,
        rank_pattern={"q_proj": 4, r"layers\.1\.mlp\.up_proj": 12},
        alpha_pattern={"v_proj": 3, "down_proj": 40},
    ),
    "layers_list": dict(
        r=8, lora_alpha=8, target_modules=ALL7, layers_to_transform=[0, 2], layers_pattern="layers"
    ),
    "layer_int": dict(
        r=8, lora_alpha=4, target_modules=["gate_proj", "o_proj"], layers_to_transform=1
    ),
    "all_linear_exclude": dict(
        r=8, lora_alpha=8, target_modules="all-linear", exclude_modules=["o_proj"]
    ),
    "exclude": dict(
        r=8, lora_alpha=8, target_modules=ALL7, exclude_modules=["down_proj", "self_attn.k_proj"]
    ),
}


def _save_peft(base_dir: Path, out: Path, seed: int = 0, **kw):
    """Save a real PEFT adapter (init_lora_weights=False, so B != 0) and return PEFT's own
    reading of that folder (PeftModel.from_pretrained), the reference for what it means."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    trained = get_peft_model(hf, LoraConfig(init_lora_weights=False, **kw))
    trained.save_pretrained(out)
    fresh = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(fresh, out).eval()
    assert set(_peft_modules(reloaded)) == set(_peft_modules(trained))
    return reloaded


@pytest.fixture(scope="module")
def cfg(tiny_llama_dir) -> ModelConfig:
    return ModelConfig.from_hf(json.loads((tiny_llama_dir / "config.json").read_text()))


@pytest.fixture(scope="module")
def saved(tiny_llama_dir, tmp_path_factory):
    """name -> (folder, PEFT model) for every spec."""
    root = tmp_path_factory.mktemp("peft_adapters")
    return {
        name: (root / name, _save_peft(tiny_llama_dir, root / name, seed=i, **kw))
        for i, (name, kw) in enumerate(SPECS.items())
    }


@pytest.fixture(scope="module")
def plain(saved) -> Path:
    return saved["r8"][0]


def _peft_modules(model) -> dict[tuple[int, str], torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in model.base_model.model.named_modules():
        if isinstance(mod, LoraLayer):
            parts = name.split(".")
            out[(int(parts[2]), parts[-1])] = mod
    return out


@pytest.mark.parametrize("name", list(SPECS))
def test_delta_matches_peft(name, saved, cfg):
    path, model = saved[name]
    adapter = load_peft_adapter(path, cfg)
    peft_mods = _peft_modules(model)
    assert peft_mods, "PEFT targeted nothing"
    assert set(adapter.modules) == set(peft_mods)  # untargeted modules are absent
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for (layer, proj), mod in peft_mods.items():
            mod = mod.double()  # float64 reference, so layer(x) - base(x) loses nothing
            x = rng.standard_normal((5, cfg.projection_shapes()[proj][0]))
            xt = torch.from_numpy(x)
            want = (mod(xt) - mod.base_layer(xt)).numpy()
            got = adapter.delta(layer, proj, x)
            assert got.shape == want.shape
            assert rel_err(got, want) <= 1e-5, (layer, proj)
            assert adapter.modules[(layer, proj)].rank == mod.r["default"]
    assert adapter.max_rank == max(m.r["default"] for m in peft_mods.values())
    assert adapter.layers == sorted({i for i, _ in peft_mods})
    assert adapter.target_projections == {p for _, p in peft_mods}
    # an untargeted module contributes zeros of the right shape
    absent = (
        next((i, p) for i in range(cfg.num_layers) for p in ALL7 if (i, p) not in adapter.modules)
        if len(adapter.modules) < 7 * cfg.num_layers
        else None
    )
    if absent is not None:
        d = adapter.delta(*absent, np.ones((2, cfg.projection_shapes()[absent[1]][0])))
        assert d.shape == (2, cfg.projection_shapes()[absent[1]][1]) and not d.any()


def test_expected_targets(saved, cfg):
    """Spot checks that the PEFT rules were exercised as intended (not only mirrored)."""
    mods = {n: set(load_peft_adapter(p, cfg).modules) for n, (p, _) in saved.items()}
    assert mods["r64_qv"] == {(i, p) for i in range(3) for p in ("q_proj", "v_proj")}
    assert mods["regex"] == {(0, "k_proj"), (0, "down_proj"), (2, "k_proj"), (2, "down_proj")}
    assert {i for i, _ in mods["layers_list"]} == {0, 2}
    assert mods["layer_int"] == {(1, "gate_proj"), (1, "o_proj")}
    assert mods["all_linear"] == {(i, p) for i in range(3) for p in ALL7}
    assert mods["all_linear_exclude"] == {(i, p) for i in range(3) for p in ALL7 if p != "o_proj"}
    assert not {p for _, p in mods["exclude"]} & {"down_proj", "k_proj"}
    pat = load_peft_adapter(saved["patterns"][0], cfg)
    assert pat.modules[(0, "q_proj")].rank == 4 and pat.modules[(1, "up_proj")].rank == 12
    assert pat.modules[(0, "up_proj")].rank == 8 and pat.ranks() == {4, 8, 12}


def test_all_linear_string_in_config(saved, cfg, tmp_path):
    """A config that still says "all-linear" reads like the list PEFT writes on save."""
    for name in ("all_linear", "all_linear_exclude"):
        src = saved[name][0]
        ref = load_peft_adapter(src, cfg)
        dst = _copy(src, tmp_path / name, target_modules="ALL-LINEAR")
        got = load_peft_adapter(dst, cfg)
        assert set(got.modules) == set(ref.modules) and got.content_hash == ref.content_hash


def _copy(src: Path, dst: Path, tensors=None, **conf_edits) -> Path:
    """Copy an adapter folder, editing config fields (None deletes) and/or tensors."""
    shutil.copytree(src, dst)
    conf_path = dst / "adapter_config.json"
    conf = json.loads(conf_path.read_text())
    for k, v in conf_edits.items():
        if v is None:
            conf.pop(k, None)
        else:
            conf[k] = v
    conf_path.write_text(json.dumps(conf))
    if tensors is not None:
        from safetensors.numpy import load_file, save_file

        st = dst / "adapter_model.safetensors"
        save_file(tensors(dict(load_file(st))), st)
    return dst


def test_content_hash(saved, cfg, tmp_path, tiny_llama_dir):
    src = saved["r8"][0]
    h = load_peft_adapter(src, cfg).content_hash
    # same content elsewhere, with irrelevant config changes and PEFT's alternative key spelling
    assert load_peft_adapter(shutil.copytree(src, tmp_path / "copy"), cfg).content_hash == h
    irrelevant = _copy(
        src, tmp_path / "irr", lora_dropout=0.3, base_model_name_or_path="x", inference_mode=False
    )
    assert load_peft_adapter(irrelevant, cfg).content_hash == h

    def rename(t):
        return {
            k.replace(".weight", ".default.weight").removeprefix("base_model.model."): v
            for k, v in t.items()
        }

    renamed = load_peft_adapter(_copy(src, tmp_path / "renamed", tensors=rename), cfg)
    assert renamed.content_hash == h
    ref = load_peft_adapter(src, cfg)
    for k, m in ref.modules.items():
        assert np.array_equal(m.a, renamed.modules[k].a) and np.array_equal(
            m.b, renamed.modules[k].b
        )
    # anything that changes outputs changes the hash
    _save_peft(tiny_llama_dir, tmp_path / "seed", seed=123, **SPECS["r8"])
    assert load_peft_adapter(tmp_path / "seed", cfg).content_hash != h
    assert load_peft_adapter(_copy(src, tmp_path / "alpha", lora_alpha=32), cfg).content_hash != h
    assert load_peft_adapter(_copy(src, tmp_path / "rs", use_rslora=True), cfg).content_hash != h


def test_bf16_weights(saved, cfg, tmp_path):
    """numpy has no bfloat16; the loader decodes it itself (bit-exact with torch's upcast)."""
    import safetensors.torch as st

    src = saved["r8"][0]
    dst = shutil.copytree(src, tmp_path / "bf16")
    tensors = st.load_file(dst / "adapter_model.safetensors")
    bf = {k: v.bfloat16() for k, v in tensors.items()}
    st.save_file(bf, dst / "adapter_model.safetensors")
    got = load_peft_adapter(dst, cfg)
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"
    assert np.array_equal(got.modules[(1, "up_proj")].a, bf[key].float().numpy().T)
    assert got.content_hash != load_peft_adapter(src, cfg).content_hash
    # non-finite values are refused in every stored dtype (bfloat16 is checked on its bits;
    # float64 must also fit float32)
    import torch

    for dtype, bad in [(torch.bfloat16, float("nan")), (torch.bfloat16, float("-inf")),
                       (torch.float16, float("inf")), (torch.float64, 1e300)]:  # fmt: skip
        t = {k: v.to(dtype) for k, v in tensors.items()}
        t[key] = t[key].clone()
        t[key][0, 1] = bad
        st.save_file(t, dst / "adapter_model.safetensors")
        with pytest.raises(AdapterWeightsError, match="NaN or Inf"):
            load_peft_adapter(dst, cfg)


def _nan(t):
    k = next(k for k in t if "lora_B" in k)
    t[k] = t[k].copy()
    t[k][0, 0] = np.nan
    return t


def _inf(t):
    k = next(k for k in t if "lora_A" in k)
    t[k] = t[k].copy()
    t[k][1, 2] = -np.inf
    return t


def _drop_b(t):
    del t[next(k for k in t if "layers.2.mlp.up_proj.lora_B" in k)]
    return t


def _narrow(t):
    k = next(k for k in t if "layers.0.self_attn.q_proj.lora_A" in k)
    t[k] = t[k][:, :-1].copy()
    return t


def _extra(name, shape):
    def edit(t):
        t[name] = np.zeros(shape, np.float32)
        return t

    return edit


REFUSALS = {
    "dora_without_magnitudes": (AdapterWeightsError, dict(use_dora=True), None),
    "modules_to_save": (UnsupportedAdapterError, dict(modules_to_save=["lm_head"]), None),
    "bias_all": (UnsupportedAdapterError, dict(bias="all"), None),
    "bias_lora_only": (UnsupportedAdapterError, dict(bias="lora_only"), None),
    "lora_bias": (UnsupportedAdapterError, dict(lora_bias=True), None),
    "not_lora": (UnsupportedAdapterError, dict(peft_type="IA3"), None),
    "pissa": (UnsupportedAdapterError, dict(init_lora_weights="pissa_niter_4"), None),
    "trainable_tokens": (UnsupportedAdapterError, dict(trainable_token_indices=[5, 6]), None),
    # LoRA on the head / embedding is served (test_vocab_lora.py): a config that targets them
    # needs their weights, and weights need a config that targets them
    "target_lm_head": (AdapterWeightsError, dict(target_modules=["q_proj", "lm_head"]), None),
    "target_embed": (AdapterWeightsError, dict(target_modules=["embed_tokens"]), None),
    "target_unknown": (UnsupportedAdapterError, dict(target_modules=["q_proj", "c_attn"]), None),
    "target_attn_block": (UnsupportedAdapterError, dict(target_modules=["self_attn"]), None),
    "regex_head": (AdapterWeightsError, dict(target_modules=r".*(q_proj|lm_head)"), None),
    "regex_none": (UnsupportedAdapterError, dict(target_modules=r"nothing\.here"), None),
    "regex_with_layers": (
        UnsupportedAdapterError,
        dict(target_modules="all-linear", layers_to_transform=[1]),
        None,
    ),
    "no_targets": (UnsupportedAdapterError, dict(target_modules=None), None),
    "embedding_lora": (
        AdapterWeightsError,
        {},
        _extra("base_model.model.model.embed_tokens.lora_embedding_A", (8, 512)),
    ),
    "magnitude_without_dora": (
        UnsupportedAdapterError,
        {},
        _extra("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", (64,)),
    ),
    "rank_mismatch": (AdapterShapeError, dict(r=4), None),
    "rank_pattern_mismatch": (AdapterShapeError, dict(rank_pattern={"v_proj": 2}), None),
    "narrow": (AdapterShapeError, {}, _narrow),
    "layer_out_of_range": (AdapterShapeError, dict(layers_to_transform=[0, 7]), None),
    "extra_layer": (
        AdapterShapeError,
        {},
        _extra("base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight", (8, 64)),
    ),
    "nan": (AdapterWeightsError, {}, _nan),
    "inf": (AdapterWeightsError, {}, _inf),
    "missing_b": (AdapterWeightsError, {}, _drop_b),
    "untargeted_weights": (AdapterWeightsError, dict(target_modules=["q_proj"]), None),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(case, plain, cfg, tmp_path):
    err, edits, tensors = REFUSALS[case]
    dst = _copy(plain, tmp_path / case, tensors=tensors, **edits)
    with pytest.raises(err) as info:
        load_peft_adapter(dst, cfg)
    if case == "target_unknown":
        assert "c_attn" in str(info.value)
    if case in ("modules_to_save", "trainable_tokens"):
        assert "adds or retrains tokens" in str(info.value)


def test_refuses_pickle_only(plain, cfg, tmp_path):
    dst = shutil.copytree(plain, tmp_path / "bin")
    (dst / "adapter_model.safetensors").unlink()
    # not a valid pickle either: the loader must refuse before ever opening it
    (dst / "adapter_model.bin").write_bytes(b"\x80\x04 not unpickled")
    with pytest.raises(UnsupportedAdapterError, match="(?s)pickle.*safetensors"):
        load_peft_adapter(dst, cfg)


def test_missing_or_corrupt_files(plain, cfg, tmp_path):
    dst = shutil.copytree(plain, tmp_path / "nost")
    (dst / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterWeightsError):
        load_peft_adapter(dst, cfg)
    dst = shutil.copytree(plain, tmp_path / "noconf")
    (dst / "adapter_config.json").unlink()
    with pytest.raises(AdapterWeightsError):
        load_peft_adapter(dst, cfg)
    dst = shutil.copytree(plain, tmp_path / "trunc")
    st = dst / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(AdapterWeightsError):
        load_peft_adapter(dst, cfg)


def test_shape_mismatch_with_base(plain, cfg):
    with pytest.raises(AdapterShapeError):
        load_peft_adapter(plain, dataclasses.replace(cfg, intermediate_size=128))
    with pytest.raises(AdapterShapeError):  # adapter has layers 0..2, model only 2
        load_peft_adapter(plain, dataclasses.replace(cfg, num_layers=2))


def test_warnings(plain, cfg, tmp_path):
    base = json.loads((plain / "adapter_config.json").read_text())["base_model_name_or_path"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_peft_adapter(plain, cfg, base_model_name=base)
        load_peft_adapter(plain, cfg)
    with pytest.warns(AdapterWarning, match="other/model"):
        load_peft_adapter(plain, cfg, base_model_name="other/model")
    ref = load_peft_adapter(plain, cfg)
    with pytest.warns(AdapterWarning, match="fan_in_fan_out"):
        got = load_peft_adapter(_copy(plain, tmp_path / "fifo", fan_in_fan_out=True), cfg)
    assert got.content_hash == ref.content_hash


def test_module_names_match_hf(hf_tiny, cfg):
    names = {n for n, _ in hf_tiny.named_modules()}
    assert {module_name(i, p) for i in range(cfg.num_layers) for p in ALL7} <= names
