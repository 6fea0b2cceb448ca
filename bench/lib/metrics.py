"""Serving metrics from per-request records, and cara-jax-vs-baseline ratios.

Every system returns one ``RequestResult`` per trace request, with times in seconds since the
replay started. The trace's arrival time is the arrival (not when a busy system got around to
reading the request), so queueing delay counts against the system that caused it.

- throughput: output tokens / makespan (first arrival to last token), and finished requests / s;
- TTFT: first token - arrival; TPOT: (last token - first token) / (tokens - 1);
  end-to-end: last token - arrival; each as mean and p50/p90/p99;
- SLO attainment: the fraction of all requests (failed ones count as misses) whose TTFT (TPOT) is
  within the TTFT (TPOT) SLO, and that meet both.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "tpot", "e2e")


@dataclasses.dataclass
class RequestResult:
    """What one system did with one trace request."""

    id: str
    arrival: float
    token_times: list[float]
    ok: bool = True
    error: str | None = None
    adapter: str | None = None
    rank: int = 0
    cold: bool | None = None  # None: the system does not know
    prompt_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.ok and self.token_times else None

    @property
    def tpot(self) -> float | None:
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if self.ok and len(t) > 1 else None

    @property
    def e2e(self) -> float | None:
        return self.token_times[-1] - self.arrival if self.ok and self.token_times else None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["token_times"] = [round(t, 6) for t in self.token_times]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestResult:
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Slo:
    ttft_s: float = 2.0
    tpot_s: float = 0.1


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def summarize(results: Sequence[RequestResult], slo: Slo | None = None) -> dict[str, float]:
    """Flat dict of figures (NaN where there is no data); keys like ``ttft_p99``."""
    slo = slo or Slo()
    ok = [r for r in results if r.ok]
    tokens = sum(len(r.token_times) for r in ok)
    start = min((r.arrival for r in results), default=0.0)
    end = max((r.token_times[-1] for r in ok if r.token_times), default=start)
    makespan = end - start
    out: dict[str, float] = {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "output_tokens": tokens,
        "makespan_s": makespan,
        "throughput_tok_s": tokens / makespan if makespan > 0 else math.nan,
        "throughput_req_s": len(ok) / makespan if makespan > 0 else math.nan,
        "decode_tok_s": _decode_rate(ok),
    }
    for name in LATENCIES:
        vals = [v for v in (getattr(r, name) for r in ok) if v is not None]
        out[f"{name}_mean"] = float(np.mean(vals)) if vals else math.nan
        for q in PERCENTILES:
            out[f"{name}_p{q}"] = _pct(vals, q)
    n = max(len(results), 1)
    ttft_ok = [r.ttft is not None and r.ttft <= slo.ttft_s for r in results]
    # a one-token answer has no TPOT: it trivially meets the TPOT SLO if it finished
    tpot_ok = [r.ok and (r.tpot is None or r.tpot <= slo.tpot_s) for r in results]
    out["slo_ttft"] = sum(ttft_ok) / n
    out["slo_tpot"] = sum(tpot_ok) / n
    out["slo_both"] = sum(a and b for a, b in zip(ttft_ok, tpot_ok, strict=True)) / n
    out["slo_ttft_s"] = slo.ttft_s
    out["slo_tpot_s"] = slo.tpot_s
    return out


HIGHER_IS_BETTER = (
    "throughput_tok_s",
    "throughput_req_s",
    "decode_tok_s",
    "slo_ttft",
    "slo_tpot",
    "slo_both",
)


def ratios(ours: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """Each figure as a "times better" ratio: ours/base where higher is better (throughput, SLO
    attainment), base/ours where lower is better (latencies); > 1 means cara-jax is ahead."""
    out = {}
    for k in HIGHER_IS_BETTER:
        out[k] = div(ours.get(k, math.nan), base.get(k, math.nan))
    for name in LATENCIES:
        for s in ("mean", *(f"p{q}" for q in PERCENTILES)):
            k = f"{name}_{s}"
            out[k] = div(base.get(k, math.nan), ours.get(k, math.nan))
    return out


def _decode_rate(ok: Sequence[RequestResult]) -> float:
    """Tokens after each request's first / the span from the first first-token to the last
    token: the decode rate with prefill and queueing before the first token left out."""
    spans = [r.token_times for r in ok if len(r.token_times) > 1]
    if not spans:
        return math.nan
    t0, t1 = min(t[0] for t in spans), max(t[-1] for t in spans)
    return sum(len(t) - 1 for t in spans) / (t1 - t0) if t1 > t0 else math.nan


def div(a: float | None, b: float | None) -> float:
    """a / b, NaN when either is missing or b is 0."""
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan
    return a / b


def by_cold(results: Sequence[RequestResult], cold: bool) -> list[RequestResult]:
    """Requests the system reported as cold (or warm)."""
    return [r for r in results if r.cold is cold]


def fmt(v: float, scale: float = 1.0, digits: int = 2) -> str:
    """A table cell: NaN as a dash."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v * scale:.{digits}f}"
