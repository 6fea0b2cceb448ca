"""Serving systems under test, one module each, behind one interface.

Each module has ``run(trace, adapters, opts) -> list[RequestResult]`` (start, replay, close) and a
system class whose ``start``/``replay``/``close`` let a sweep replay many traces on one loaded
system. ``make_system`` builds one by key; heavy imports happen only when a system starts.
"""

from __future__ import annotations

from bench.systems.common import RunOptions, System, SystemUnavailable

SYSTEM_KEYS = ("cara", "hf", "llamacpp")
LABELS = {"cara": "cara-jax", "hf": "HF+PEFT", "llamacpp": "llama.cpp"}


def make_system(key: str, opts: RunOptions, label: str | None = None) -> System:
    if key == "cara":
        from bench.systems.cara import CaraSystem

        return CaraSystem(opts, label)
    if key == "hf":
        from bench.systems.hf_peft import HfPeftSystem

        return HfPeftSystem(opts, label)
    if key == "llamacpp":
        from bench.systems.llamacpp import LlamaCppSystem

        return LlamaCppSystem(opts, label)
    raise ValueError(f"unknown system {key!r}; choose from {SYSTEM_KEYS}")


__all__ = ["SYSTEM_KEYS", "LABELS", "RunOptions", "System", "SystemUnavailable", "make_system"]
