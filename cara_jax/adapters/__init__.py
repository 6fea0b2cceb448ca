"""LoRA adapters: PEFT loading, host/device tiers, batched multi-LoRA kernels (references), the
differentiable grouped op, adapters as pytrees and trainable sets."""

from cara_jax.adapters.device_pool import DevicePool, PoolConfig, PoolFullError
from cara_jax.adapters.lora_set import LoraSet
from cara_jax.adapters.multi_lora import MultiLoraHook, bgmv, mbgmv, multi_lora_delta, sgmv
from cara_jax.adapters.peft import (
    AdapterError,
    AdapterShapeError,
    AdapterWarning,
    AdapterWeightsError,
    LoraAdapter,
    LoraModule,
    UnsupportedAdapterError,
    load_peft_adapter,
)
from cara_jax.adapters.pool_load import LoadHandle
from cara_jax.adapters.store import AdapterRegistry, HostStore, UnknownAdapterError
from cara_jax.adapters.trees import adapter_from_tree, adapter_tree, save_peft_adapter

__all__ = [
    "AdapterError", "AdapterRegistry", "AdapterShapeError", "AdapterWarning",
    "AdapterWeightsError", "DevicePool", "HostStore", "LoadHandle", "LoraAdapter", "LoraModule",
    "LoraSet", "MultiLoraHook", "PoolConfig", "PoolFullError", "UnknownAdapterError",
    "UnsupportedAdapterError", "adapter_from_tree", "adapter_tree", "bgmv", "load_peft_adapter",
    "mbgmv", "multi_lora_delta", "save_peft_adapter", "sgmv",
]  # fmt: skip
