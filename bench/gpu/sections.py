"""End-to-end sections of the GPU check: cold-start TTFT by mode and multi-adapter decode throughput.

Both run the real ``Engine`` on a Llama-2-7B-shaped model with random weights (no download):
hidden 4096, intermediate 11008, 32 heads, 32 KV heads, vocab 32000, bfloat16. Only
``CARA_GPU_CHECK_LAYERS`` of the 32 layers are built (default 8): every program is compiled
per engine and layer count, and at full depth the compiles and the adapter files (640 MB per
rank-64 adapter) do not fit one call beside the kernel checks. Per-layer costs (prefill, adapter
bytes, CPU deltas) scale together, so TTFT ratios keep their meaning; absolute tok/s is higher than
at 32 layers, and host overheads weigh more. Each row records the depth it ran.

- ``cold_start``: requests whose adapter is not on the device (each its own adapter, ranks 16 and
  64 on all seven projections), one at a time and in a small burst, in each cold-start mode;
  median TTFT per mode and the ratios to ``cached`` (adapters pinned on the device, the ideal).
- ``e2e_throughput``: 16 concurrent requests over 16 adapters (``cached``), bgmv and mbgmv decode,
  beside the base model serving the same batch without adapters.

The programs a run uses (one per token bucket the cases reach) are compiled before anything is
timed, once per section where engines share a shape (compiled executables take every buffer as an
argument, so engines of equal runner/pool shapes and LoRA strategy can share them); an untimed
pass of every case then runs first. Rows note any compile that still happened while timing
(should be 0). ``--smoke`` runs tiny shapes and smaller batches on any backend
(about a minute on 2 CPU cores, most of it compiling).

Parts: bench/gpu/engine_setup.py (the model, adapters, pools, compiled programs, serving),
bench/gpu/cold_start.py, bench/gpu/throughput.py and bench/gpu/lora_step.py (one section each);
this module registers them with bench/gpu_check.py.
"""

from __future__ import annotations

from collections.abc import Callable

from bench.gpu.cold_start import (  # noqa: F401  (MODES, cold_plan: re-exported for the tests)
    MODES,
    cold_plan,
    cold_start_section,
)
from bench.gpu.lora_step import lora_step_section
from bench.gpu.throughput import e2e_throughput_section


def register(section: Callable) -> None:
    """Register both sections with gpu_check's ``section`` decorator (once per registry: when
    gpu_check runs as ``__main__`` its registry is not the imported module's)."""
    if id(section) in _REGISTERED:
        return
    _REGISTERED.add(id(section))
    section("cold_start", "Cold-start TTFT by mode (Llama-7B shapes, random weights)")(
        cold_start_section
    )
    section("e2e_throughput", "Decode throughput: 16 concurrent requests over 16 adapters")(
        e2e_throughput_section
    )
    section("lora_step", "Engine LoRA step on Pallas vs jnp: 16 decode rows over 14 adapters")(
        lora_step_section
    )


_REGISTERED: set[int] = set()
