"""Load PEFT LoRA folders into host memory, validated all-or-nothing.

The result keeps, per (layer, projection), A as [in, r] and B as [r, out] with PEFT's scaling
folded into B, so every consumer (device pool, CPU workers) computes the delta as x·A·B.

Which modules an adapter targets follows PEFT's own rules (peft_config.py). Anything PEFT
would apply differently from a plain x·A·B·scaling (the other variants, biases, extra saved
modules, base-modifying inits) is refused rather than served wrong. DoRA (``use_dora``) is served: each module then also carries its
magnitude vector, and the device path rescales the projection's output (adapters/dora.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np

from cara_jax.adapters.peft_config import (  # noqa: F401  (re-exported: the adapter errors)
    _PARENT,
    AdapterError,
    AdapterShapeError,
    AdapterWarning,
    AdapterWeightsError,
    UnsupportedAdapterError,
    _check_config,
    module_name,
    module_scaling,
    scaled_b,
)
from cara_jax.adapters.peft_vocab import (
    VocabModules,
    is_vocab_key,
    read_vocab_modules,
    vocab_targets,
)
from cara_jax.config import ModelConfig
from cara_jax.lora_hooks import PROJECTIONS

_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<mod>.+?)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)
_MAGNITUDE_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<mod>.+?)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$"
)
_LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.")
# Raw safetensors dtypes accepted; BF16 is kept as uint16 bits (numpy has no bfloat16).
_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """One targeted projection of one layer: delta(x) = x @ a @ b; with DoRA's magnitude ``m``
    the output is m / ||W + a·b||_col * (x·W + x·a·b) instead (PEFT's DoRA, norms over ``in``)."""

    a: np.ndarray  # [in, r] float32 (PEFT lora_A.weight seen transposed: not C-contiguous)
    b: np.ndarray  # [r, out] float32 (PEFT lora_B.weight transposed, scaling folded in)
    m: np.ndarray | None = None  # [out] float32: DoRA's magnitude vector (None: plain LoRA)

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """A validated adapter in host memory; ``content_hash`` is its identity (not its path)."""

    path: str
    content_hash: str
    modules: dict[tuple[int, str], LoraModule]
    base_model_name_or_path: str | None = None
    # (in, out) of every projection of the base model, so delta() can size an absent module.
    projection_shapes: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    # LoRA on the token embedding and the LM head (peft_vocab.py)
    vocab: VocabModules = dataclasses.field(default_factory=VocabModules)

    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}

    @property
    def max_rank(self) -> int:
        return max(self.ranks(), default=0)

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes + (0 if m.m is None else m.m.nbytes)
                   for m in self.modules.values()) + sum(
            a.nbytes + b.nbytes for a, b in self.vocab.modules.values())  # fmt: skip

    @property
    def dora(self) -> bool:
        """Whether this is a DoRA adapter (its modules carry magnitude vectors)."""
        return any(m.m is not None for m in self.modules.values())

    def cost_rank(self, num_layers: int) -> int:
        """The rank scheduling counts: this adapter's rank rows weighted by their widths, in
        units of one rank row on all seven projections of every layer (what the profiler's
        adapters hold). A rank-8 adapter on q/k/v/o of SmolLM2 reads 38% of a rank-8 one on all
        seven, and costs a step about that share; counting its max rank would hold back
        admission for work the step never does."""
        full = num_layers * sum(i + o for i, o in self.projection_shapes.values())
        if not self.modules or not full:
            return self.max_rank
        rows = sum(m.rank * (m.a.shape[0] + m.b.shape[1]) for m in self.modules.values())
        return max(1, round(rows / full))

    @property
    def target_projections(self) -> set[str]:
        return {p for _, p in self.modules}

    @property
    def layers(self) -> list[int]:
        return sorted({i for i, _ in self.modules})

    def delta(self, layer: int, proj: str, x: np.ndarray) -> np.ndarray:
        """Reference LoRA contribution x @ a @ b (zeros for an untargeted module); a DoRA
        module's output also needs the base weight (adapters/dora.py)."""
        m = self.modules.get((layer, proj))
        if m is None:
            return np.zeros((*x.shape[:-1], self.projection_shapes[proj][1]), np.float32)
        return (x @ m.a) @ m.b


def _read_safetensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Parse a safetensors file without executing anything: name -> (dtype tag, raw array).

    Each tensor is read into an array of its own, so what a caller keeps (A of a float32
    adapter, as is) does not hold the rest of the file in memory."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            body = path.stat().st_size - 8 - n
            header.pop("__metadata__", None)
            out = {}
            for name, info in header.items():
                tag, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
                if tag not in _ST_DTYPES:
                    raise AdapterWeightsError(
                        f"{path.name}: tensor {name!r} has dtype {tag}, not a float"
                    )
                dt = np.dtype(_ST_DTYPES[tag])
                if end - start != math.prod(shape) * dt.itemsize or not 0 <= start <= end <= body:
                    raise AdapterWeightsError(
                        f"{path.name}: tensor {name!r} has inconsistent offsets"
                    )
                arr = np.empty(shape, dt)
                f.seek(8 + n + start)
                if f.readinto(memoryview(arr).cast("B")) != end - start:
                    raise AdapterWeightsError(f"{path.name}: tensor {name!r} is truncated")
                out[name] = (tag, arr)
        return out
    except AdapterWeightsError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AdapterWeightsError(f"cannot read {path}: {e}") from e


def _as_float32(tag: str, raw: np.ndarray) -> np.ndarray:
    """The tensor as float32: itself when it already is (no copy)."""
    if tag == "F32":
        return raw
    if tag == "BF16":  # bfloat16 is the top half of a float32
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def _finite(tag: str, raw: np.ndarray) -> bool:
    """No NaN or Inf in the tensor once it is float32, without making that copy: a float64 sum
    of float32/float16 values cannot overflow, and NaN or Inf propagate through it; bfloat16
    (kept as its bits) is non-finite where its exponent bits are all ones; float64 must also
    fit float32."""
    if tag == "BF16":
        return not bool(np.any((raw & 0x7F80) == 0x7F80))
    if tag == "F64":
        return bool(np.isfinite(raw.astype(np.float32)).all())
    return bool(np.isfinite(np.sum(raw, dtype=np.float64)))


def load_peft_adapter(
    path: str | Path, cfg: ModelConfig, *, base_model_name: str | None = None
) -> LoraAdapter:
    """Parse and validate a PEFT LoRA folder against ``cfg`` (raises an AdapterError subclass).

    Nothing is returned unless every tensor and config field checks out, so a caller never sees a
    half-loaded adapter.
    """
    path = Path(path)
    conf_path, st_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not conf_path.is_file():
        raise AdapterWeightsError(f"{path} has no adapter_config.json")
    try:
        conf = json.loads(conf_path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterWeightsError(f"{conf_path} is not readable JSON: {e}") from e
    if not isinstance(conf, dict):
        raise AdapterWeightsError(f"{conf_path} is not a JSON object")
    if not st_path.is_file():
        if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
            raise UnsupportedAdapterError(
                f"{path} holds only pickle weights (adapter_model.bin); pickle is refused because "
                "loading it can run arbitrary code. Re-save the adapter as adapter_model.safetensors"
            )
        raise AdapterWeightsError(f"{path} has no adapter_model.safetensors")
    targeted = _check_config(conf, cfg)
    if conf.get("fan_in_fan_out"):
        warnings.warn(
            "fan_in_fan_out=True does not apply to Llama's nn.Linear projections; "
            "treated as False, as PEFT does",
            AdapterWarning,
            stacklevel=2,
        )
    base = conf.get("base_model_name_or_path")
    if base_model_name and base and base != base_model_name:
        warnings.warn(
            f"adapter {path} was trained on {base!r}; serving it on {base_model_name!r}",
            AdapterWarning,
            stacklevel=2,
        )

    by_name = {module_name(i, p): (i, p) for i in range(cfg.num_layers) for p in PROJECTIONS}
    pairs: dict[tuple[int, str], dict[str, tuple[str, np.ndarray]]] = {}
    use_dora = bool(conf.get("use_dora"))
    tensors = _read_safetensors(st_path)
    vocab_kinds = vocab_targets(conf, targeted, cfg)
    if vocab_kinds and use_dora:
        raise UnsupportedAdapterError("DoRA on the embedding or the LM head is not supported")
    for key, raw in tensors.items():
        if is_vocab_key(key):
            continue  # read_vocab_modules, below
        mm = _MAGNITUDE_RE.match(key)
        if mm is not None:
            mod = mm.group("mod") if mm.group("mod").startswith("model.") else f"model.{mm.group('mod')}"
            if not use_dora:
                raise UnsupportedAdapterError(
                    f"{key}: a DoRA magnitude vector in an adapter whose config has no use_dora"
                )
            if mod not in by_name:
                raise UnsupportedAdapterError(
                    f"{key}: DoRA magnitude of {mm.group('mod')!r}, not a Llama projection"
                )
            slot = pairs.setdefault(by_name[mod], {})
            if "M" in slot:
                raise AdapterWeightsError(f"{key}: the magnitude of {mod} appears twice")
            slot["M"] = raw
            continue
        m = _KEY_RE.match(key)
        mod = m.group("mod") if m else ""
        mod = mod if mod.startswith("model.") else f"model.{mod}"
        if m is None or mod not in by_name:
            lm = _LAYER_RE.match(m.group("mod")) if m else None
            if lm and int(lm.group(1)) >= cfg.num_layers:
                raise AdapterShapeError(
                    f"{key}: layer {lm.group(1)} but the base model has {cfg.num_layers} layers"
                )
            raise UnsupportedAdapterError(
                f"unexpected tensor {key!r}: not LoRA A/B of a Llama projection"
            )
        ab = m.group("ab")
        slot = pairs.setdefault(by_name[mod], {})
        if ab in slot:
            raise AdapterWeightsError(f"{key}: lora_{ab} of {mod} appears twice")
        slot[ab] = raw

    shapes = cfg.projection_shapes()
    targeted_set = set(targeted)
    for layer, proj in pairs:
        if module_name(layer, proj) not in targeted_set:
            raise AdapterWeightsError(
                f"weights for {module_name(layer, proj)}, which the config does not target"
            )
    modules: dict[tuple[int, str], LoraModule] = {}
    h = hashlib.sha256(b"cara-jax lora v1\0")
    for name in targeted:
        if name not in by_name:  # embed_tokens / lm_head: read_vocab_modules
            continue
        layer, proj = by_name[name]
        have = pairs.get((layer, proj), {})
        if not {"A", "B"} <= set(have) or (use_dora and "M" not in have):
            missing = " and ".join(
                [f"lora_{x}" for x in "AB" if x not in have]
                + (["the DoRA magnitude (lora_magnitude_vector)"] if use_dora and "M" not in have else [])
            )
            raise AdapterWeightsError(f"{name}: {missing} weights missing")
        (tag_a, raw_a), (tag_b, raw_b) = have["A"], have["B"]
        din, dout = shapes[proj]
        scaling = module_scaling(conf, name, have["A"], have["B"], din, dout, what=proj,
                                 finite=_finite)  # fmt: skip
        mag = None
        if use_dora:
            tag_m, raw_m = have["M"]
            if raw_m.shape != (dout,):
                raise AdapterShapeError(
                    f"{name}: lora_magnitude_vector {tuple(raw_m.shape)} does not fit the base "
                    f"model's {proj} ({dout} outputs)"
                )
            if not _finite(tag_m, raw_m):
                raise AdapterWeightsError(f"{name}: the DoRA magnitude contains NaN or Inf")
            mag = np.ascontiguousarray(_as_float32(tag_m, raw_m))
        # A stays PEFT's [r, in] array, seen transposed (the pool's layout is that array, so
        # packing it is a plain copy); B is transposed with the scaling folded in
        b = scaled_b(_as_float32(tag_b, raw_b), scaling)
        modules[(layer, proj)] = LoraModule(a=_as_float32(tag_a, raw_a).T, b=b, m=mag)
        # Identity = what changes outputs: which modules, their effective scaling, the stored
        # tensors. Config spelling, key naming, paths and mtimes do not enter.
        h.update(
            f"{name}|{float(scaling).hex()}|{tag_a}{raw_a.shape}|{tag_b}{raw_b.shape}|".encode()
        )
        h.update(raw_a)
        h.update(raw_b)
        if mag is not None:
            h.update(f"dora|{tag_m}|".encode())
            h.update(raw_m)
    vocab = read_vocab_modules(conf, cfg, tensors, vocab_kinds, _as_float32, _finite, h)
    return LoraAdapter(
        path=str(path),
        content_hash=h.hexdigest(),
        modules=modules,
        base_model_name_or_path=base,
        projection_shapes=shapes,
        vocab=vocab,
    )
