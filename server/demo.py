"""Small random PEFT adapters for demos and tests (``cara-serve --demo-adapters N``).

They are real PEFT folders (adapter_config.json + adapter_model.safetensors) sized for the base
model, seeded by index so every run writes the same bytes. Random weights teach the model nothing;
they are large enough to change its greedy output, which makes the adapter visible.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from cara_jax.config import ModelConfig

DEMO_TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")
DEMO_FORMAT = 1  # bump when the generator changes, so cached folders are rewritten


def cache_root() -> Path:
    root = os.environ.get("CARA_JAX_CACHE") or Path.home() / ".cache" / "cara_jax"
    return Path(root).expanduser() / "demo_adapters"


def write_demo_adapter(path: Path, cfg: ModelConfig, rank: int, seed: int) -> None:
    """Write one random LoRA adapter for ``cfg`` into ``path`` (atomically)."""
    rng = np.random.default_rng(seed)
    shapes = cfg.projection_shapes()
    tensors = {}
    for layer in range(cfg.num_layers):
        for p in DEMO_TARGETS:
            din, dout = shapes[p]
            mod = "self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{mod}.{p}"
            a = rng.standard_normal((rank, din)) / np.sqrt(din)
            b = rng.standard_normal((dout, rank)) * (0.5 / np.sqrt(rank))
            tensors[f"{key}.lora_A.weight"] = a.astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = b.astype(np.float32)
    conf = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "target_modules": list(DEMO_TARGETS),
        "bias": "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2))
        try:
            tmp.rename(path)
        except OSError:  # another process wrote it first: keep theirs (same bytes)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
