"""Random LoRA adapters written as real PEFT folders (adapter_config.json +
adapter_model.safetensors, PEFT's key names) for a model's shapes: for demos, the profiler,
benches and tests, where timing or visibility matters and the values do not. Seeded, so a seed
writes the same bytes every time.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from cara_jax.config import ModelConfig
from cara_jax.lora_hooks import PROJECTIONS

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_random_peft(
    path: Path,
    cfg: ModelConfig,
    rank: int,
    seed: int,
    targets: tuple[str, ...] | list[str] = PROJECTIONS,
    alpha: float | None = None,
    b_std: float = 0.01,
    dora_base: dict | None = None,
    vocab: bool = False,
) -> Path:
    """Write one adapter into ``path`` (atomically: a reader never sees half a folder; if
    another process wrote it first, theirs is kept). A ~ N(0, 1/in), B ~ N(0, b_std²);
    ``alpha`` defaults to 2 * rank. ``dora_base`` (the base's [layers, in, out] kernels per
    projection, LoadedModel.kernels): a DoRA adapter, magnitudes ‖W‖ per output times 1 ± 5%.
    ``vocab``: LoRA on the embedding and the LM head too (PEFT's names and shapes)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    shapes = cfg.projection_shapes()
    tensors = {}
    for layer in range(cfg.num_layers):
        for p in targets:
            din, dout = shapes[p]
            mod = "self_attn" if p in ATTENTION else "mlp"
            key = f"base_model.model.model.layers.{layer}.{mod}.{p}"
            a = rng.standard_normal((rank, din), dtype=np.float32) / np.float32(np.sqrt(din))
            b = rng.standard_normal((dout, rank), dtype=np.float32) * np.float32(b_std)
            tensors[f"{key}.lora_A.weight"] = a
            tensors[f"{key}.lora_B.weight"] = b
            if dora_base is not None:
                w = np.asarray(dora_base[p][layer], np.float32)
                noise = 1 + 0.05 * rng.standard_normal(dout, dtype=np.float32)
                tensors[f"{key}.lora_magnitude_vector"] = np.linalg.norm(w, axis=0) * noise
    if vocab:
        v, hid = cfg.vocab_size, cfg.hidden_size
        emb, head = "base_model.model.model.embed_tokens", "base_model.model.lm_head"
        tensors[f"{emb}.lora_embedding_A"] = rng.standard_normal((rank, v), dtype=np.float32)
        tensors[f"{emb}.lora_embedding_B"] = (
            rng.standard_normal((hid, rank), dtype=np.float32) * np.float32(b_std))
        tensors[f"{head}.lora_A.weight"] = (
            rng.standard_normal((rank, hid), dtype=np.float32) / np.float32(np.sqrt(hid)))
        tensors[f"{head}.lora_B.weight"] = (
            rng.standard_normal((v, rank), dtype=np.float32) * np.float32(b_std))
    conf = {
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank if alpha is None else alpha,
        "target_modules": list(targets) + (["embed_tokens", "lm_head"] if vocab else []), "bias": "none", "lora_dropout": 0.0,
        "use_rslora": False, "use_dora": dora_base is not None, "fan_in_fan_out": False,
        "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
    }  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():  # rewrite: the new folder replaces the old one
        shutil.rmtree(path)
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
    return path
