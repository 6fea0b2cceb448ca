"""Load PEFT LoRA folders into host memory, validated all-or-nothing.

The result keeps, per (layer, projection), A as [in, r] and B as [r, out] with the PEFT scaling
folded into B, so every consumer (device pool, CPU workers) computes the delta as x·A·B.
Target-module rules follow PEFT's own matching (suffix or exact name for a list, full regex
match for a string, "all-linear", layers_to_transform/layers_pattern, exclude_modules,
rank_pattern/alpha_pattern keys matched as a suffix pattern).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cara_jax.config import ModelConfig
from cara_jax.lora_hooks import PROJECTIONS


class AdapterError(ValueError):
    """An adapter folder cannot be used; the message says what and why."""


class UnsupportedAdapterError(AdapterError):
    """A PEFT feature this server does not serve (DoRA, modules_to_save, biases, pickle, ...)."""


class AdapterShapeError(AdapterError):
    """Tensor shapes or layer indices that do not fit the base model or the config's ranks."""


class AdapterWeightsError(AdapterError):
    """Missing, unreadable, incomplete or non-finite weights."""


class AdapterWarning(UserWarning):
    """Suspicious but servable (e.g. trained on a differently named base model)."""


_MODULE_OF = {
    p: ("self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp")
    for p in PROJECTIONS
}
_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)
_OTHER_LLAMA_MODULES = (
    "embed_tokens",
    "lm_head",
    "norm",
    "input_layernorm",
    "post_attention_layernorm",
    "rotary_emb",
)


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """One targeted projection of one layer: delta(x) = x @ a @ b."""

    a: np.ndarray  # [in, r] float32
    b: np.ndarray  # [r, out] float32, scaling folded in

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    path: str
    content_hash: str
    modules: dict[tuple[int, str], LoraModule]
    base_model_name_or_path: str | None = None

    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}

    @property
    def max_rank(self) -> int:
        return max(self.ranks(), default=0)

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())

    @property
    def target_projections(self) -> set[str]:
        return {p for _, p in self.modules}

    @property
    def layers(self) -> list[int]:
        return sorted({i for i, _ in self.modules})

    def delta(self, layer: int, proj: str, x: np.ndarray) -> np.ndarray:
        m = self.modules.get((layer, proj))
        if m is None:
            return np.zeros((*x.shape[:-1], _out_dim(self, proj, x)), np.float32)
        return (x @ m.a) @ m.b


def _out_dim(adapter: LoraAdapter, proj: str, x: np.ndarray) -> int:
    for (_, p), m in adapter.modules.items():
        if p == proj:
            return m.b.shape[1]
    raise KeyError(proj)


def module_name(layer: int, proj: str) -> str:
    """The module's name inside an HF LlamaForCausalLM, as PEFT matches it."""
    return f"model.layers.{layer}.{_MODULE_OF[proj]}.{proj}"


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
    if tm == "all-linear":
        return True  # every Llama projection (the LM head is excluded by PEFT)
    if isinstance(tm, str):
        return re.fullmatch(tm, key) is not None
    tm = list(tm or [])
    if key in tm:
        return True
    found = any(key.endswith(f".{t}") for t in tm)
    idx = conf.get("layers_to_transform")
    if found and idx is not None and (not isinstance(idx, list) or idx):
        pats = conf.get("layers_pattern")
        if not pats:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            m = None
            for pat in [pats] if isinstance(pats, str) else pats:
                m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", key)
                if m:
                    break
        if m is None:
            return False
        layer = int(m.group("idx"))
        return layer == idx if isinstance(idx, int) else layer in idx
    return found


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    for pat, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


def _check_config(conf: dict[str, Any], cfg: ModelConfig) -> None:
    ptype = str(conf.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise UnsupportedAdapterError(f"peft_type {ptype!r} is not LoRA")
    if conf.get("use_dora"):
        raise UnsupportedAdapterError("DoRA adapters (use_dora=true) are not supported")
    if conf.get("modules_to_save"):
        raise UnsupportedAdapterError(
            f"modules_to_save={conf['modules_to_save']} would replace base-model modules per "
            "adapter; this server shares one base model, so such adapters are refused"
        )
    if conf.get("bias", "none") != "none":
        raise UnsupportedAdapterError(f"bias={conf['bias']!r}: only bias='none' is supported")
    for k in ("target_parameters", "trainable_token_indices"):
        if conf.get(k):
            raise UnsupportedAdapterError(f"{k} is not supported")
    if not conf.get("target_modules"):
        raise UnsupportedAdapterError("adapter_config.json has no target_modules")
    tm = conf["target_modules"]
    if isinstance(tm, list):
        known = set(PROJECTIONS) | {f"{_MODULE_OF[p]}.{p}" for p in PROJECTIONS}
        for t in tm:
            leaf = t.split(".")[-1]
            if leaf in _OTHER_LLAMA_MODULES:
                raise UnsupportedAdapterError(
                    f"target module {t!r} is not a linear projection of a decoder layer; only "
                    f"{', '.join(PROJECTIONS)} can carry LoRA here"
                )
            matches = any(
                _targets({"target_modules": [t]}, module_name(i, p))
                for i in range(cfg.num_layers)
                for p in PROJECTIONS
            )
            if not matches and leaf not in known:
                raise UnsupportedAdapterError(f"unknown target module {t!r} for a Llama model")
    elif isinstance(tm, str) and tm != "all-linear":
        for other in ("model.embed_tokens", "lm_head"):
            if re.fullmatch(tm, other):
                raise UnsupportedAdapterError(
                    f"target regex {tm!r} matches {other}, which is not supported"
                )


def load_peft_adapter(
    path: str | Path, cfg: ModelConfig, *, base_model_name: str | None = None
) -> LoraAdapter:
    """Parse and validate a PEFT LoRA folder against ``cfg`` (raises an AdapterError subclass)."""
    path = Path(path)
    conf_path = path / "adapter_config.json"
    if not conf_path.is_file():
        raise AdapterWeightsError(f"{path} has no adapter_config.json")
    try:
        conf = json.loads(conf_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterWeightsError(f"adapter_config.json is not valid JSON: {e}") from e
    st_path = path / "adapter_model.safetensors"
    if not st_path.is_file():
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise UnsupportedAdapterError(
                "only pickle weights (adapter_model.bin) were found; pickle files are never "
                "loaded (they can run code). Convert them to adapter_model.safetensors"
            )
        raise AdapterWeightsError(f"{path} has no adapter_model.safetensors")
    _check_config(conf, cfg)
    if conf.get("fan_in_fan_out"):
        warnings.warn(
            "fan_in_fan_out=True does not apply to Llama's nn.Linear projections; "
            "treated as False (as PEFT does)",
            AdapterWarning,
            stacklevel=2,
        )
    base = conf.get("base_model_name_or_path")
    if base_model_name and base and base != base_model_name:
        warnings.warn(
            f"adapter was trained on {base!r}, serving it on {base_model_name!r}",
            AdapterWarning,
            stacklevel=2,
        )
    try:
        from safetensors.numpy import load_file

        tensors = load_file(str(st_path))
    except Exception as e:
        raise AdapterWeightsError(f"cannot read {st_path.name}: {e}") from e

    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            if "lora_magnitude_vector" in key:
                raise UnsupportedAdapterError("DoRA magnitude vectors found: DoRA is not supported")
            if "lora_embedding" in key or "embed_tokens" in key or "lm_head" in key:
                raise UnsupportedAdapterError(
                    f"LoRA on embeddings / LM head is not supported ({key})"
                )
            raise UnsupportedAdapterError(f"unexpected tensor {key!r} in a LoRA adapter")
        layer, mod, proj, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if proj not in PROJECTIONS or _MODULE_OF[proj] != mod:
            raise UnsupportedAdapterError(f"unknown target module {mod}.{proj}")
        if layer >= cfg.num_layers:
            raise AdapterShapeError(
                f"{key}: layer {layer} but the base model has {cfg.num_layers} layers"
            )
        pairs.setdefault((layer, proj), {})[ab] = t

    shapes = cfg.projection_shapes()
    use_rslora = bool(conf.get("use_rslora", False))
    r_default = int(conf.get("r", 8))
    alpha_default = float(conf.get("lora_alpha", r_default))
    modules: dict[tuple[int, str], LoraModule] = {}
    for layer in range(cfg.num_layers):
        for proj in PROJECTIONS:
            name = module_name(layer, proj)
            targeted = _targets(conf, name)
            have = pairs.pop((layer, proj), None)
            if not targeted:
                if have is not None:
                    raise AdapterWeightsError(
                        f"weights for {name} but the config does not target it"
                    )
                continue
            if have is None or set(have) != {"A", "B"}:
                raise AdapterWeightsError(f"{name}: lora_A and lora_B weights are both required")
            a, b = have["A"], have["B"]
            din, dout = shapes[proj]
            r = int(_pattern_value(conf.get("rank_pattern"), name, r_default))
            if a.ndim != 2 or b.ndim != 2 or a.shape != (r, din) or b.shape != (dout, r):
                raise AdapterShapeError(
                    f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                    f"rank {r} and the base model's {proj} ({din} -> {dout})"
                )
            a = np.asarray(a, np.float32)
            b = np.asarray(b, np.float32)
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise AdapterWeightsError(f"{name}: weights contain NaN or Inf")
            alpha = float(_pattern_value(conf.get("alpha_pattern"), name, alpha_default))
            scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
            modules[(layer, proj)] = LoraModule(
                a=np.ascontiguousarray(a.T), b=np.ascontiguousarray(b.T * scaling)
            )
    if pairs:
        (layer, proj), _ = next(iter(pairs.items()))
        raise AdapterWeightsError(
            f"weights for {module_name(layer, proj)} but the config does not target it"
        )
    if not modules:
        raise UnsupportedAdapterError(
            "the adapter's target_modules match no projection of this model"
        )
    return LoraAdapter(
        path=str(path),
        content_hash=_content_hash(conf, tensors),
        modules=modules,
        base_model_name_or_path=base,
    )


_HASHED_CONFIG = (
    "r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern", "alpha_pattern",
    "layers_to_transform", "layers_pattern", "exclude_modules",
)  # fmt: skip


def _content_hash(conf: dict[str, Any], tensors: dict[str, np.ndarray]) -> str:
    """Identity by content: the config fields that change outputs and every tensor's bytes."""
    h = hashlib.sha256()
    h.update(
        json.dumps({k: conf.get(k) for k in _HASHED_CONFIG}, sort_keys=True, default=str).encode()
    )
    for key in sorted(tensors):
        t = np.ascontiguousarray(tensors[key])
        h.update(f"{key}:{t.dtype.str}:{t.shape}".encode())
        h.update(t.tobytes())
    return h.hexdigest()
