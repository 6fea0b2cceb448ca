"""LoRA adapters: PEFT loading, host/device tiers, batched multi-LoRA kernels (references)."""

from cara_jax.adapters.device_pool import DevicePool, PoolConfig, PoolFullError
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

__all__ = [
    "AdapterError", "AdapterRegistry", "AdapterShapeError", "AdapterWarning",
    "AdapterWeightsError", "DevicePool", "HostStore", "LoadHandle", "LoraAdapter", "LoraModule",
    "MultiLoraHook", "PoolConfig", "PoolFullError", "UnknownAdapterError",
    "UnsupportedAdapterError", "bgmv", "load_peft_adapter", "mbgmv", "multi_lora_delta", "sgmv",
]  # fmt: skip
