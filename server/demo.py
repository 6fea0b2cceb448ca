"""Small random PEFT adapters for demos and tests (``cara-serve --demo-adapters N``).

They are real PEFT folders (adapter_config.json + adapter_model.safetensors) sized for the base
model, seeded by index so every run writes the same bytes. Random weights teach the model nothing;
they are large enough to change its greedy output, which makes the adapter visible.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from cara_jax.adapters.random_peft import write_random_peft
from cara_jax.config import ModelConfig

DEMO_TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")
DEMO_FORMAT = 2  # bump when the generator changes, so cached folders are rewritten


def cache_root() -> Path:
    root = os.environ.get("CARA_JAX_CACHE") or Path.home() / ".cache" / "cara_jax"
    return Path(root).expanduser() / "demo_adapters"


def write_demo_adapter(path: Path, cfg: ModelConfig, rank: int, seed: int) -> None:
    """Write one random LoRA adapter for ``cfg`` into ``path`` (atomically): q/v/o/down, B
    large enough to change the greedy output."""
    write_random_peft(path, cfg, rank, seed, DEMO_TARGETS, alpha=rank, b_std=0.5 / np.sqrt(rank))


def demo_adapters(
    cfg: ModelConfig, count: int, rank: int = 8, root: Path | None = None
) -> dict[str, Path]:
    """``{"demo-0": folder, ...}``, written once per model shape under the cache folder."""
    shape = json.dumps([cfg.num_layers, sorted(cfg.projection_shapes().items()), rank, DEMO_FORMAT])
    key = hashlib.sha256(shape.encode()).hexdigest()[:16]
    base = (root or cache_root()) / key
    out = {}
    for i in range(count):
        path = base / f"demo-{i}"
        if not (path / "adapter_config.json").is_file():
            write_demo_adapter(path, cfg, rank, seed=1000 + i)
        out[f"demo-{i}"] = path
    return out
