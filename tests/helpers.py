"""Reference adapters for the parity tests: real PEFT adapters saved to disk, and PEFT's own
mixed-batch model over them (what the engine's outputs are compared with)."""

from __future__ import annotations

import torch

from cara_jax.config import PROJECTIONS

ALL7 = list(PROJECTIONS)

# name -> LoraConfig kwargs; together they cover ranks 8..128, rsLoRA, alpha != r,
# q/v only, all-linear, rank_pattern / alpha_pattern
ADAPTERS = {
    "r8": dict(r=8, lora_alpha=8, target_modules=ALL7),
    "r16_alpha": dict(r=16, lora_alpha=48, target_modules="all-linear"),
    "r32_rslora": dict(r=32, lora_alpha=16, use_rslora=True, target_modules=ALL7),
    "r64_qv": dict(r=64, lora_alpha=128, target_modules=["q_proj", "v_proj"]),
    "r128_pattern": dict(
        r=128,
        lora_alpha=64,
        target_modules=ALL7,
        rank_pattern={"q_proj": 16, "down_proj": 24},
        alpha_pattern={"v_proj": 12},
    ),
}


def make_peft_adapters(base, out_dir, specs, seed=0, scale=1.0):
    """Save real PEFT adapters (init_lora_weights=False, so B != 0).

    ``base`` is an HF checkpoint folder or a callable returning a fresh HF model.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for i, (name, kw) in enumerate(specs.items()):
        torch.manual_seed(seed + i)
        if callable(base):
            model_in = base()
        else:
            model_in = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        base_model = model_in
        model = get_peft_model(base_model, LoraConfig(init_lora_weights=False, **kw))
        if scale != 1.0:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_" in n:
                        p.mul_(scale)
        path = out_dir / name
        model.save_pretrained(path)
        paths[name] = path
    return paths


def peft_mixed(hf_model, paths):
    from peft import PeftModel

    names = list(paths)
    model = PeftModel.from_pretrained(hf_model, paths[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(paths[n], adapter_name=n)
    return model.eval()
