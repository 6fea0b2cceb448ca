"""Model configuration for Llama-family checkpoints (HF config.json or GGUF metadata)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

# the LoRA-targetable projections of a Llama-family layer, in the order a layer runs them
PROJECTIONS: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)  # fmt: skip

# projections that share an input, in the order a layer runs them (one host exchange per
# (layer, group) in CPU-assisted prefill; the CPU workers size their buffers by them)
GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)
)


class UnsupportedModelError(ValueError):
    """The checkpoint is not a Llama-family model this project can run."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """HF `rope_scaling`: only the types Llama-family checkpoints use are supported."""

    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, d: dict[str, Any] | None) -> RopeScaling:
        if not d:
            return cls()
        kind = d.get("rope_type", d.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise UnsupportedModelError(f"rope_scaling type {kind!r} is not supported")
        return cls(
            rope_type=kind,
            factor=float(d.get("factor", 1.0)),
            low_freq_factor=float(d.get("low_freq_factor", 1.0)),
            high_freq_factor=float(d.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)),
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; frozen so it can be a static jit argument."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    name: str = "llama"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of the seven LoRA-targetable projections of one layer."""
        h, m = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, m),
            "up_proj": (h, m),
            "down_proj": (m, h),
        }

    def num_params(self) -> int:
        per_layer = sum(i * o for i, o in self.projection_shapes().values()) + 2 * self.hidden_size
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else emb
        return emb + head + self.num_layers * per_layer + self.hidden_size

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies (float32), with HF's linear / llama3 rescaling."""
        d = self.head_dim
        # float32 throughout, as HF computes it, so positions x inv_freq match bit for bit.
        exps = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
        inv = np.float32(1.0) / (np.float32(self.rope_theta) ** exps)
        rs = self.rope_scaling
        if rs.rope_type == "linear":
            inv = inv / rs.factor
        elif rs.rope_type == "llama3":
            old = rs.original_max_position_embeddings
            low_wavelen = old / rs.low_freq_factor
            high_wavelen = old / rs.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
            smooth = (old / wavelen - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = np.where(medium, smoothed, scaled)
        return inv.astype(np.float32)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        arch = d.get("model_type", "llama")
        if arch != "llama" or d.get("attention_bias") or d.get("mlp_bias"):
            raise UnsupportedModelError(
                f"model_type={arch!r} (attention_bias={d.get('attention_bias')}, "
                f"mlp_bias={d.get('mlp_bias')}) is not a plain Llama checkpoint"
            )
        # transformers >= 5 writes `rope_parameters`; older files `rope_theta` + `rope_scaling`.
        rope = dict(d.get("rope_parameters") or {})
        theta = float(d.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        scaling = d.get("rope_scaling") or (
            rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (SwiGLU/silu only)")
        n_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=n_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or n_heads),
            head_dim=int(d.get("head_dim") or hidden // n_heads),
            rope_theta=theta,
            rope_scaling=RopeScaling.from_hf(scaling),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            name=str(d.get("_name_or_path") or "llama"),
        )
