"""CPU side of the CPU-assisted cold start: LoRA deltas x·A·B computed by worker processes over
shared memory while a cold adapter is being copied to the device (docs/cpu_lora.md).

Names are imported lazily: importing the package must not import numpy, so that a process
(``python -m bench.cpu_lora_kernels``) can still limit BLAS to one thread before numpy loads.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "lora_delta": "kernels", "lora_numba": "kernels", "lora_numpy": "kernels",
    "CallTiming": "workers", "CpuLoraConfig": "workers", "CpuLoraPool": "workers",
    "CpuLoraTicket": "workers", "CpuWorkerError": "workers", "CpuWorkerTimeout": "workers",
}  # fmt: skip
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"cpu_lora.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'cpu_lora' has no attribute {name!r}")
