"""What an experiment runs (bench/experiments/plans.py builds it, bench/experiments/runner.py runs it,
bench/experiments/report.py writes it up): its workload points, the systems and the cara-jax
configurations."""

from __future__ import annotations

import dataclasses

from bench.lib.workload import WorkloadSpec
from bench.systems.common import RunOptions


@dataclasses.dataclass
class Point:
    label: str
    x: float
    spec: WorkloadSpec


@dataclasses.dataclass
class Plan:
    """What an experiment runs: its points, systems and cara-jax configurations."""

    name: str
    title: str
    points: list[Point]
    xlabel: str
    systems: list[str]
    cara: list[tuple[str, RunOptions]]  # (label, options) per cara-jax configuration
    baseline_opts: RunOptions
    targets: str
    notes: list[str] = dataclasses.field(default_factory=list)
