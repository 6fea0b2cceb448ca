"""PEFT's LoraConfig checked against a Llama model: what it targets, and what is refused.

Targeting follows PEFT's own rules (peft.tuners.tuners_utils.check_target_module_exists) applied
to the module names of an HF ``LlamaForCausalLM``: a list matches a name exactly or as a dotted
suffix and is then filtered by layers_to_transform/layers_pattern; a string is a full regex match
(no layer filter); exclude_modules wins over both; rank_pattern/alpha_pattern keys match as
``(.*\\.)?(key)$``, first key in file order wins. The loader (peft.py) reads the weights of what
this selects; the adapter errors live here so both can raise them.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from cara_jax.config import ModelConfig
from cara_jax.lora_hooks import PROJECTIONS


class AdapterError(ValueError):
    """An adapter folder cannot be used; the message says what and why."""


class UnsupportedAdapterError(AdapterError):
    """A PEFT feature this server does not serve (modules_to_save, biases, pickle, ...)."""


class AdapterShapeError(AdapterError):
    """Tensor shapes, ranks or layer indices that do not fit the base model or the config."""


class AdapterWeightsError(AdapterError):
    """Missing, unreadable, incomplete or non-finite weights."""


class AdapterWarning(UserWarning):
    """Suspicious but servable (e.g. trained on a differently named base model)."""


_PARENT = {
    p: "self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for p in PROJECTIONS
}
# LoraConfig fields that change the forward pass away from x·A·B·scaling (PEFT's LoRA variants
# and friends); any truthy value is refused.
_VARIANT_FIELDS = (
    "lora_bias", "alora_invocation_tokens", "velora_config", "monteclora_config",
    "use_bdlora", "arrow_config", "kasa_config", "use_qalora", "layer_replication",
    "target_parameters",
)  # fmt: skip
# the modules outside the decoder layers that can carry LoRA: the token embedding (PEFT's
# lora_embedding_A/B) and the LM head (a plain linear LoRA); adapters/peft_vocab.py
VOCAB_MODULES = {"model.embed_tokens": "embed_tokens", "lm_head": "lm_head"}
NEW_TOKENS = (
    "adds or retrains tokens (a vocabulary of its own); this server serves every adapter on the "
    "base model's one vocabulary and embedding, so such adapters are refused"
)
# init_lora_weights values whose saved adapter only works on a base model PEFT rewrote in place
# (W - B·A·s); PEFT's conversion on save (path_initial_model_for_weight_conversion) resets it.
_BASE_MODIFYING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def module_name(layer: int, proj: str) -> str:
    """The module's name inside an HF LlamaForCausalLM, the key PEFT matches targets against."""
    return f"model.layers.{layer}.{_PARENT[proj]}.{proj}"


def _llama_module_names(num_layers: int) -> list[str]:
    """Every named module of an HF LlamaForCausalLM (what PEFT iterates over)."""
    names = [
        "model",
        "model.embed_tokens",
        "model.layers",
        "model.norm",
        "model.rotary_emb",
        "lm_head",
    ]
    for i in range(num_layers):
        p = f"model.layers.{i}"
        names += [p, f"{p}.self_attn", f"{p}.mlp", f"{p}.mlp.act_fn"]
        names += [f"{p}.input_layernorm", f"{p}.post_attention_layernorm"]
        names += [module_name(i, proj) for proj in PROJECTIONS]
    return names


def _targets(conf: dict[str, Any], key: str) -> bool:
    """PEFT's check_target_module_exists for one module name."""
    excl = conf.get("exclude_modules")
    if excl:
        if isinstance(excl, str):
            if re.fullmatch(excl, key):
                return False
        elif key in excl or any(key.endswith(f".{e}") for e in excl):
            return False
    tm = conf.get("target_modules")
    if isinstance(tm, str):
        return re.fullmatch(tm, key) is not None
    if key in tm:  # an exact name bypasses layers_to_transform, as in PEFT
        return True
    if not any(key.endswith(f".{t}") for t in tm):
        return False
    idx = conf.get("layers_to_transform")
    if idx is None or (isinstance(idx, list) and not idx):
        return True
    pats = conf.get("layers_pattern")
    m = None
    if not pats:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pat in [pats] if isinstance(pats, str) else pats:
            m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", key)
            if m is not None:
                break
    if m is None:
        return False
    layer = int(m.group("idx"))
    return layer == idx if isinstance(idx, int) else layer in idx


def _expand_all_linear(conf: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """Rewrite "all-linear" (any case) as PEFT does before matching: the full names of every
    nn.Linear except the LM head, i.e. every decoder-layer projection; exclude_modules still applies.
    """
    tm = conf.get("target_modules")
    if not (isinstance(tm, str) and tm.lower() == "all-linear"):
        return conf
    full = [module_name(i, p) for i in range(cfg.num_layers) for p in PROJECTIONS]
    return {**conf, "target_modules": full}


def _pattern_value(patterns: dict[str, Any] | None, key: str, default: Any) -> Any:
    """PEFT's get_pattern_key: first pattern (file order) matching a dotted suffix of ``key``."""
    for pat, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


def _check_config(conf: dict[str, Any], cfg: ModelConfig) -> list[str]:
    """Refuse what cannot be served exactly; return the targeted projection module names."""
    ptype = str(conf.get("peft_type") or "LORA").upper()
    if ptype != "LORA":
        raise UnsupportedAdapterError(f"peft_type {ptype!r} is not LoRA")
    for field in _VARIANT_FIELDS:
        if conf.get(field):
            raise UnsupportedAdapterError(
                f"{field}={conf[field]!r}: this LoRA variant changes the forward pass beyond "
                "x·A·B·scaling and is not supported"
            )
    if conf.get("trainable_token_indices"):
        raise UnsupportedAdapterError(f"trainable_token_indices: the adapter {NEW_TOKENS}")
    saved = conf.get("modules_to_save") or []
    if any(str(m).split(".")[-1] in ("embed_tokens", "lm_head") for m in saved):
        raise UnsupportedAdapterError(
            f"modules_to_save={saved}: the adapter saves its own embedding or LM head, which is "
            f"what a resized vocabulary needs: it {NEW_TOKENS}"
        )
    if saved:
        raise UnsupportedAdapterError(
            f"modules_to_save={conf['modules_to_save']} would replace base-model modules per "
            "adapter; this server shares one base model, so such adapters are refused"
        )
    if (conf.get("bias") or "none") != "none":
        raise UnsupportedAdapterError(
            f"bias={conf['bias']!r} trains base-model biases (Llama has none); only 'none' is supported"
        )
    init = conf.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise UnsupportedAdapterError(
            f"init_lora_weights={init!r} adapters expect a base model PEFT modified in place; "
            "re-save with path_initial_model_for_weight_conversion to get a plain LoRA"
        )
    tm = conf.get("target_modules")
    if not tm or not isinstance(tm, (str, list)):
        raise UnsupportedAdapterError(
            f"target_modules={tm!r}: a list or a regex string is required"
        )
    idx = conf.get("layers_to_transform")
    if isinstance(tm, str) and (idx is not None or conf.get("layers_pattern") is not None):
        raise UnsupportedAdapterError(  # LoraConfig.__post_init__ refuses this too
            "layers_to_transform / layers_pattern cannot be combined with a string target_modules"
        )
    for i in [idx] if isinstance(idx, int) else idx or []:
        if not 0 <= i < cfg.num_layers:
            raise AdapterShapeError(
                f"layers_to_transform names layer {i} but the base model has {cfg.num_layers} layers"
            )
    conf = _expand_all_linear(conf, cfg)
    tm = conf["target_modules"]
    names = _llama_module_names(cfg.num_layers)
    projections = set(module_name(i, p) for i in range(cfg.num_layers) for p in PROJECTIONS)
    if isinstance(tm, list):
        for t in tm:
            if not any(n == t or n.endswith(f".{t}") for n in names):
                raise UnsupportedAdapterError(
                    f"unknown target module {t!r}: not a module of a Llama model "
                    f"(LoRA can target {', '.join(PROJECTIONS)}, embed_tokens and lm_head)"
                )
    targeted = [n for n in names if _targets(conf, n)]
    for n in targeted:
        if n not in projections and n not in VOCAB_MODULES:
            raise UnsupportedAdapterError(
                f"target_modules {tm!r} selects {n!r}, which cannot carry LoRA here: only "
                f"{', '.join(PROJECTIONS)}, embed_tokens and lm_head can"
            )
    if not targeted:
        raise UnsupportedAdapterError(f"target_modules {tm!r} match no projection of this model")
    return targeted


def module_scaling(
    conf: dict[str, Any], name: str, a, b, din: int, dout: int, labels=("lora_A", "lora_B"),
    what: str = "", finite=None,
) -> float:
    """Check one module's factors ``a`` / ``b`` ((dtype tag, raw array) each, PEFT's [r, in] /
    [out, r]) against its rank and alpha (the config's patterns) and the base's shapes; its
    scaling (alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    r = _pattern_value(conf.get("rank_pattern"), name, conf.get("r", 8))
    alpha = _pattern_value(conf.get("alpha_pattern"), name, conf.get("lora_alpha", 8))
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
        raise AdapterShapeError(f"{name}: invalid rank {r!r} / lora_alpha {alpha!r}")
    (tag_a, raw_a), (tag_b, raw_b) = a, b
    if raw_a.shape != (r, din) or raw_b.shape != (dout, r):
        raise AdapterShapeError(
            f"{name}: {labels[0]} {tuple(raw_a.shape)} / {labels[1]} {tuple(raw_b.shape)} do not "
            f"fit rank {r} (config) and the base model's {what} ({din} -> {dout}); expected "
            f"({r}, {din}) / ({dout}, {r})"
        )
    if finite is not None and not (finite(tag_a, raw_a) and finite(tag_b, raw_b)):
        raise AdapterWeightsError(f"{name}: weights contain NaN or Inf")
    return alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r


def scaled_b(b_float32: np.ndarray, scaling: float) -> np.ndarray:
    """PEFT's B [out, r] as [r, out] with the scaling folded in: transposed and scaled in one
    pass, the product taken in float64 and rounded once."""
    out = np.empty(b_float32.shape[::-1], np.float32)
    np.multiply(b_float32.T, scaling, out=out, dtype=np.float64, casting="unsafe")
    return out
