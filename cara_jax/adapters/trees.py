"""Adapters as pytrees: LoRA weights as JAX users hold them, in and out of cara-jax.

In: ``adapter_from_tree`` reads any pytree of LoRA factors (a nested dict, a flax ``nnx.State``)
into a validated ``LoraAdapter``, the host form every tier uses. A leaf is an A or a B factor of
one (layer, projection), found from its path:
- JAX layout, x @ a @ b: flax nnx ``LoRA`` (``lora_a`` [in, r], ``lora_b`` [r, out]) and qwix /
  Tunix (``kernel_lora_a``, ``kernel_lora_b``);
- PEFT layout, W + B·A: a dict keyed by PEFT module names (``...q_proj.lora_A.weight`` [r, in],
  ``...lora_B.weight`` [out, r]), e.g. a safetensors file read into memory.
The default path map finds ``layers/<i>/.../<projection>`` in the path; a ``path_map``
callable maps other naming schemes (path string -> (layer, projection) or None to skip).
``alpha`` scales as PEFT does (alpha / r); None means the factors are used as they are (flax
nnx.LoRA has no scaling).

Out: ``save_peft_adapter`` writes adapter_config.json + adapter_model.safetensors that HF PEFT
(and cara-jax) load; the scaling is folded into B, so the file says lora_alpha = r.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cara_jax.adapters.peft import (
    AdapterShapeError,
    AdapterWeightsError,
    LoraAdapter,
    LoraModule,
    UnsupportedAdapterError,
    module_name,
)
from cara_jax.config import PROJECTIONS, ModelConfig

PathMap = Callable[[str], "tuple[int, str] | None"]
_DEFAULT_RE = re.compile(r"(?:^|/)layers/(\d+)/(?:.*/)?(" + "|".join(PROJECTIONS) + r")(?:/|$)")
# the factor a leaf holds: lower case = JAX layout (x @ a @ b), upper case = PEFT (torch) layout
_FACTOR_RE = re.compile(r"(?:^|/|_)lora_([abAB])(?:/|$)")
# LoRA leaves this server cannot serve as x·A·B on a projection (DoRA, embeddings, LM head)
_UNSUPPORTED_RE = re.compile(r"magnitude|lora_embedding|(?:^|/)(?:lm_head|embed_tokens)(?:/|$)")


def _key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def tree_paths(tree: Any) -> list[tuple[str, Any]]:
    """(path, leaf) pairs with '/'-joined paths; dotted keys (PEFT names) are split on '.' too,
    and a trailing ``value`` (flax Variables) or ``weight`` (PEFT) is dropped."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = "/".join(_key_str(k) for k in path).replace(".", "/").split("/")
        while parts and parts[-1] in ("value", "raw_value", "weight"):
            parts.pop()
        out.append(("/".join(parts), leaf))
    return out


def default_path_map(path: str) -> tuple[int, str] | None:
    m = _DEFAULT_RE.search(path)
    return (int(m.group(1)), m.group(2)) if m else None


def adapter_from_tree(
    tree: Any,
    cfg: ModelConfig,
    *,
    alpha: float | None = None,
    path_map: PathMap | None = None,
    name: str = "<memory>",
) -> LoraAdapter:
    """A validated LoraAdapter from a pytree of LoRA factors (see the module docstring); raises
    an AdapterError subclass naming the leaf when a factor is missing, misshapen or not finite."""
    path_map = path_map or default_path_map
    shapes = cfg.projection_shapes()
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for path, leaf in tree_paths(tree):
        f = _FACTOR_RE.search(path)
        if _UNSUPPORTED_RE.search(path) and (f or "lora" in path):
            raise UnsupportedAdapterError(f"{path}: DoRA magnitudes and LoRA on embeddings or "
                                          "the LM head are not supported")  # fmt: skip
        if f is None:
            continue  # not a LoRA factor (say, a base weight in the same tree)
        where = path_map(path)
        if where is None:
            raise AdapterShapeError(f"{path}: a LoRA factor whose layer and projection the "
                                    "path map cannot tell (pass path_map=...)")  # fmt: skip
        layer, proj = where
        if not 0 <= layer < cfg.num_layers or proj not in shapes:
            raise AdapterShapeError(f"{path}: no projection {proj!r} in layer {layer} of the base")
        arr = np.asarray(jax.device_get(leaf), np.float32)
        factor = f.group(1)
        if factor.isupper():  # PEFT layout: A [r, in], B [out, r]
            arr = arr.T
        slot = found.setdefault((layer, proj), {})
        if factor.lower() in slot:
            raise AdapterWeightsError(f"{path}: a second lora_{factor.lower()} for {proj} of "
                                      f"layer {layer}")  # fmt: skip
        slot[factor.lower()] = arr
    if not found:
        raise AdapterWeightsError("the tree holds no LoRA factors (lora_a/lora_b, kernel_lora_a/"
                                  "kernel_lora_b or PEFT lora_A/lora_B leaves under layers/<i>)")  # fmt: skip
    modules: dict[tuple[int, str], LoraModule] = {}
    h = hashlib.sha256(b"cara-jax lora tree v1\0")
    for (layer, proj), ab in sorted(found.items()):
        label = module_name(layer, proj)
        if set(ab) != {"a", "b"}:
            raise AdapterWeightsError(f"{label}: lora_{'b' if 'a' in ab else 'a'} missing")
        a, b = ab["a"], ab["b"]
        din, dout = shapes[proj]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != din or b.shape[1] != dout \
                or a.shape[1] != b.shape[0] or a.shape[1] == 0:  # fmt: skip
            raise AdapterShapeError(
                f"{label}: A {a.shape} / B {b.shape} (JAX layout) do not fit the base's {proj} "
                f"({din} -> {dout}); expected ({din}, r) / (r, {dout})"
            )
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise AdapterWeightsError(f"{label}: weights contain NaN or Inf")
        r = a.shape[1]
        scale = 1.0 if alpha is None else alpha / r
        a = np.ascontiguousarray(a)
        b = np.ascontiguousarray(b * np.float32(scale)) if scale != 1.0 else np.ascontiguousarray(b)
        modules[(layer, proj)] = LoraModule(a=a, b=b)
        h.update(f"{label}|{a.shape}|{b.shape}|".encode())
        h.update(a)
        h.update(b)
    return LoraAdapter(path=name, content_hash=h.hexdigest(), modules=modules,
                       projection_shapes=shapes)  # fmt: skip


def adapter_source(
    cfg: ModelConfig, name: str, path: str | Path | None, weights: Any, alpha: float | None,
    path_map: PathMap | None,
) -> str | Path | LoraAdapter:  # fmt: skip
    """What ``Engine.load_adapter`` registers: the folder, or the weights (a LoraAdapter, or a
    tree read here); exactly one of them must be given."""
    if (path is None) == (weights is None):
        raise TypeError("load_adapter takes a folder path or weights, exactly one")
    if weights is None:
        return path
    if isinstance(weights, LoraAdapter):  # validated and hashed again, like any tree
        weights = adapter_tree(weights)
    return adapter_from_tree(weights, cfg, alpha=alpha, path_map=path_map,
                             name=f"<memory:{name}>")  # fmt: skip


def adapter_tree(adapter: LoraAdapter) -> dict:
    """The adapter as a nested dict in JAX layout, ``layers/<i>/<proj>/lora_a|lora_b`` (the
    scaling is already in lora_b): what ``adapter_from_tree`` reads back unchanged. Plain LoRA
    only (a DoRA adapter's magnitudes have no place in it: UnsupportedAdapterError)."""
    if adapter.dora or adapter.vocab.modules:
        raise UnsupportedAdapterError(f"{adapter.path}: a DoRA adapter, or LoRA on the "
                                      "embedding or the LM head, has no tree form")  # fmt: skip
    out: dict = {"layers": {}}
    for (layer, proj), m in sorted(adapter.modules.items()):
        out["layers"].setdefault(layer, {})[proj] = {"lora_a": np.asarray(m.a),
                                                     "lora_b": np.asarray(m.b)}  # fmt: skip
    return out


def save_peft_adapter(
    adapter: LoraAdapter | Any,
    out_dir: str | Path,
    cfg: ModelConfig | None = None,
    *,
    alpha: float | None = None,
    path_map: PathMap | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write ``adapter`` (a LoraAdapter, or a tree read as ``adapter_from_tree`` reads it, which
    needs ``cfg``) as a PEFT LoRA folder: adapter_config.json + adapter_model.safetensors."""
    from safetensors.numpy import save_file

    if not isinstance(adapter, LoraAdapter):
        if cfg is None:
            raise TypeError("save_peft_adapter needs the base's ModelConfig to read a tree")
        adapter = adapter_from_tree(adapter, cfg, alpha=alpha, path_map=path_map)
    if adapter.dora or adapter.vocab.modules:
        raise UnsupportedAdapterError(f"{adapter.path}: saving DoRA adapters or LoRA on the "
                                      "embedding or the LM head is not supported (those "
                                      "weights would be lost)")  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = {key: module_name(*key) for key in adapter.modules}
    ranks = {names[k]: m.rank for k, m in adapter.modules.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    pattern = {n: v for n, v in sorted(ranks.items()) if v != r}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r,
        "target_modules": sorted(names.values()), "rank_pattern": pattern,
        "alpha_pattern": dict(pattern), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True,
        "base_model_name_or_path": base_model_name_or_path or adapter.base_model_name_or_path,
    }  # fmt: skip
    tensors = {}
    for key, m in adapter.modules.items():
        prefix = f"base_model.model.{names[key]}"
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(np.asarray(m.a, np.float32).T)
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(np.asarray(m.b, np.float32).T)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
