"""PNG plots of the experiments (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _clean(v: float | None) -> float:
    return math.nan if v is None else v


def line_plot(
    path: Path,
    xs: list[float],
    series: dict[str, dict[str, list[float]]],
    panels: list[tuple[str, str]],
    xlabel: str,
    title: str,
    logx: bool = False,
) -> Path:
    """One panel per (metric key, y label); one line per system. ``series[system][key]``."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (key, ylabel) in zip(axes[0], panels, strict=True):
        for name, data in series.items():
            ys = [_clean(v) for v in data.get(key, [])]
            if ys and not all(math.isnan(y) for y in ys):
                ax.plot(xs[: len(ys)], ys, marker="o", label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logx:
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 110), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def bar_plot(
    path: Path,
    groups: list[str],
    bars: dict[str, list[float]],
    ylabel: str,
    title: str,
) -> Path:
    """Grouped bars: one group per entry of ``groups``, one bar per key of ``bars``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(groups) + 2), 3.6))
    n = max(len(bars), 1)
    width = 0.8 / n
    for i, (label, ys) in enumerate(bars.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [0 if math.isnan(_clean(y)) else y for y in ys], width, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if len(bars) > 1:
        ax.legend(fontsize=8)
    ax.set_title(textwrap.fill(title, 70), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
