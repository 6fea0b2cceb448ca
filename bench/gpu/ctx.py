"""The context every bench/gpu_check section receives (its own module, so that the sections in
bench/gpu/sections.py and the runner in bench/gpu_check.py import it without importing each
other)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Ctx:
    smoke: bool
    interpret: bool
    repeats: int
    device: str
    deadline: float = float("inf")  # perf_counter time after which sections skip the rest
    hbm_bytes_per_s: float | None = None  # set by the hbm section
    notes: list[str] = dataclasses.field(default_factory=list)
