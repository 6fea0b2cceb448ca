"""Profiled latency models of decode and prefill steps, fitted by least squares.

Why: a multi-LoRA decode step costs more with the batch's LoRA work, and how that work is counted
depends on the kernel (CaraServe, section "Kernels and why scheduling must know ranks"):

- BGMV pads every row to the batch's max rank:   PERF_bgmv  = a * |S| * max_rank + b
- MBGMV runs each row at its own rank:           PERF_mbgmv = a * sum(rank)      + b

Admission and routing predict a step before running it, so they need these numbers for the
device, model, dtype and kernel actually serving; ``profiler.py`` measures them and
``fit_cost_model`` fits them. A fit may add a base term in the batch size (``c * |S|``) and a term in the real
(unpadded) rank rows when it clearly raises R^2 (on a CPU the base GEMMs are compute bound and
grow with |S|).

Shapes are padded: the runner compiles steps for bucketed rows, rank and summed rank, and a step
costs what its padded shape costs. ``Buckets`` records that grid; every feature is computed on
padded values (empty buckets = exact values, e.g. for a kernel without bucketing).

Also fitted: the base model's decode latency vs |S| (no adapter), the reference of the default
TPOT SLO (1.5x base at the same batch size), and a prefill model (latency vs prompt tokens and
rank). All latencies are seconds. Models are saved in one JSON file keyed by
``model|device|dtype|kernel`` (``CostModel.save`` merges into an existing file).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

KERNELS = ("bgmv", "mbgmv")
FILE_FORMAT = "cara-jax-cost-models/1"
DEFAULT_SLO_FACTOR = 1.5
# A richer form replaces the paper's form only when it raises R^2 by at least this much.
MIN_R2_GAIN = 0.01

DECODE_CORE = ("work", "one")
DECODE_OPTIONAL = ("batch", "rank_rows")
BASE_FEATURES = ("batch", "one")
PREFILL_CORE = ("tokens", "lora_tokens", "one")
PREFILL_OPTIONAL = ("attn", "lora")


def pad(value: int, buckets: Sequence[int]) -> int:
    """The bucket a value runs in (beyond the last bucket or without buckets: the value)."""
    if value <= 0 or not buckets:
        return max(value, 0)
    i = bisect.bisect_left(buckets, value)
    return buckets[i] if i < len(buckets) else value


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The runner's padding grid; a step costs what its padded shape costs (empty = exact)."""

    rows: tuple[int, ...] = ()  # decode batch rows
    rank: tuple[int, ...] = ()  # max-rank buckets (BGMV decode and the prefill segment kernel)
    total_rank: tuple[int, ...] = ()  # summed-rank buckets (MBGMV decode)
    prefill_rows: tuple[int, ...] = ()
    prefill_len: tuple[int, ...] = ()
    prefill_batch: int = 0  # prompts per prefill step; a longer queue takes several (0: no cap)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Buckets:
        if not d:
            return cls()
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def decode_features(
    kernel: str, buckets: Buckets, n: int, max_rank: int, sum_rank: int
) -> dict[str, float]:
    """Features of a decode step of n rows: ``work`` is the kernel's LoRA work on padded
    shapes; ``rank_rows`` the real (unpadded) rank rows, whose weights are actually read
    (padding rows all point at one zero row, which stays in cache)."""
    s = pad(n, buckets.rows)
    if max_rank <= 0:
        work = 0
    elif kernel == "bgmv":
        work = s * pad(max_rank, buckets.rank)
    else:
        work = pad(sum_rank, buckets.total_rank)
    return {
        "one": 1.0, "batch": float(s), "work": float(work), "rank_rows": float(max(sum_rank, 0)),
        "lora": float(max_rank > 0),
    }  # fmt: skip


def prefill_features(
    buckets: Buckets, lengths: Sequence[int], ranks: Sequence[int]
) -> dict[str, float]:
    """Features of prefilling prompts of ``lengths`` with adapters of ``ranks`` (0 = none).

    Prompts go in chunks of ``buckets.prefill_batch``; each chunk is one padded step: tokens =
    rows x length, attention ~ rows x length^2, LoRA work = tokens x max rank (the segment
    kernel pads each segment to the chunk's max rank).
    """
    out = dict.fromkeys(("one", "tokens", "lora_tokens", "attn", "lora"), 0.0)
    if not lengths:
        return out
    k = buckets.prefill_batch or len(lengths)
    for i in range(0, len(lengths), k):
        ls, rs = lengths[i : i + k], ranks[i : i + k]
        if buckets.prefill_rows or buckets.prefill_len:
            rows, length = pad(len(ls), buckets.prefill_rows), pad(max(ls), buckets.prefill_len)
            tokens, attn = rows * length, rows * length * length
        else:
            tokens, attn = sum(ls), sum(x * x for x in ls)
        r = pad(max(rs, default=0), buckets.rank)
        out["one"] += 1
        out["tokens"] += tokens
        out["attn"] += attn
        out["lora_tokens"] += tokens * r
        out["lora"] += float(r > 0)
    return out


@dataclasses.dataclass(frozen=True)
class LinearFit:
    """y = sum(coef[i] * x[features[i]]); r2 and rmse on the points it was fitted to."""

    features: tuple[str, ...]
    coef: tuple[float, ...]
    r2: float = math.nan
    rmse: float = math.nan
    n: int = 0

    def predict(self, x: Mapping[str, float]) -> float:
        return sum(c * x[f] for f, c in zip(self.features, self.coef, strict=True))

    def get(self, feature: str) -> float:
        """Coefficient of a feature (0 if the form does not use it)."""
        return self.weights.get(feature, 0.0)

    @functools.cached_property
    def weights(self) -> dict[str, float]:
        """Feature -> coefficient (the fast path of the predictions below)."""
        return dict(zip(self.features, self.coef, strict=True))

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(self.features), "coef": list(self.coef), "r2": self.r2,
            "rmse": self.rmse, "n": self.n,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LinearFit:
        return cls(
            tuple(d["features"]), tuple(float(c) for c in d["coef"]),
            float(d.get("r2", math.nan)), float(d.get("rmse", math.nan)), int(d.get("n", 0)),
        )  # fmt: skip


def fit_linear(
    xs: Sequence[Mapping[str, float]],
    y: Sequence[float],
    features: Sequence[str],
    nonneg: bool = True,
) -> LinearFit:
    """Least squares over ``features`` (numpy lstsq), with R^2 and RMSE.

    ``nonneg``: a feature other than the intercept that gets a negative coefficient is dropped
    and the rest refitted, so predictions never fall as work grows (routing compares deltas).
    """
    feats = list(features)
    yv = np.asarray(y, np.float64)
    if len(xs) != len(yv) or not len(yv):
        raise ValueError("need as many feature rows as targets, and at least one")
    while True:
        a = np.array([[x[f] for f in feats] for x in xs], np.float64)
        coef = np.linalg.lstsq(a, yv, rcond=None)[0]
        neg = [(c, f) for c, f in zip(coef, feats, strict=True) if f != "one" and c < 0]
        if not nonneg or not neg:
            break
        feats.remove(min(neg)[1])
    pred = a @ coef
    ss_res = float(np.sum((yv - pred) ** 2))
    ss_tot = float(np.sum((yv - yv.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res < 1e-18 else 0.0)
    return LinearFit(
        tuple(feats), tuple(float(c) for c in coef), r2, math.sqrt(ss_res / len(yv)), len(yv)
    )


def select_form(
    xs: Sequence[Mapping[str, float]],
    y: Sequence[float],
    core: Sequence[str],
    optional: Sequence[str],
    min_gain: float = MIN_R2_GAIN,
) -> tuple[LinearFit, dict[str, LinearFit]]:
    """Fit ``core``, then add optional features one at a time while each raises R^2 by at
    least ``min_gain``. Returns (chosen fit, every form tried by name)."""
    best = fit_linear(xs, y, core)
    tried = {"+".join(best.features): best}
    rest = [f for f in optional if f not in core]
    while rest:
        cands = [(fit_linear(xs, y, (*best.features[:-1], f, "one")), f) for f in rest]
        for c, _ in cands:
            tried["+".join(c.features)] = c
        cand, f = max(cands, key=lambda cf: cf[0].r2)
        if cand.r2 - best.r2 < min_gain or f not in cand.features:
            break
        best = cand
        rest.remove(f)
    return best, tried


@dataclasses.dataclass
class CostModel:
    """Fitted decode / base / prefill models of one (model, device, dtype, kernel)."""

    model: str
    device: str
    dtype: str
    kernel: str
    decode: LinearFit  # steps with at least one LoRA row
    base: LinearFit  # steps without adapters: the reference of the default SLO
    prefill: LinearFit
    buckets: Buckets = Buckets()
    alternatives: dict[str, LinearFit] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    samples: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, not {self.kernel!r}")

    @property
    def key(self) -> str:
        return model_key(self.model, self.device, self.dtype, self.kernel)

    # ------------------------------------------------------------------ predictions

    def decode_latency_of(self, n: int, max_rank: int, sum_rank: int) -> float:
        """Decode step of n rows whose largest rank is ``max_rank`` and ranks sum to
        ``sum_rank`` (rank 0 = base-model row); O(1), for schedulers keeping running sums."""
        if n <= 0:
            return 0.0
        if max_rank <= 0:
            return self.base_latency(n)
        # decode_features inlined: schedulers call this for every instance and candidate
        b = self.buckets
        s = pad(n, b.rows)
        work = s * pad(max_rank, b.rank) if self.kernel == "bgmv" else pad(sum_rank, b.total_rank)
        w = self.decode.weights
        return (
            w.get("work", 0.0) * work + w.get("batch", 0.0) * s + w.get("lora", 0.0)
            + w.get("rank_rows", 0.0) * sum_rank + w.get("one", 0.0)
        )  # fmt: skip

    def decode_latency(self, ranks: Iterable[int]) -> float:
        """Predicted decode step latency of a batch with these adapter ranks."""
        rs = list(ranks)
        return self.decode_latency_of(len(rs), max(rs, default=0), sum(rs))

    def base_latency(self, batch: int) -> float:
        """Decode step of ``batch`` rows on the base model (no adapter)."""
        if batch <= 0:
            return 0.0
        w = self.base.weights
        return w.get("batch", 0.0) * pad(batch, self.buckets.rows) + w.get("one", 0.0)

    def default_slo(self, batch: int, factor: float = DEFAULT_SLO_FACTOR) -> float:
        """Default TPOT SLO at a batch size: ``factor`` x the base model's step latency."""
        return factor * self.base_latency(max(batch, 1))

    def prefill_latency(self, lengths: Sequence[int], ranks: Sequence[int] | None = None) -> float:
        """Prefill of prompts of these lengths (ranks: their adapters' ranks, 0 = none)."""
        if not lengths:
            return 0.0
        rs = list(ranks) if ranks is not None else [0] * len(lengths)
        x = prefill_features(self.buckets, list(lengths), rs)
        return sum(c * x[f] for f, c in self.prefill.weights.items())

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "device": self.device, "dtype": self.dtype,
            "kernel": self.kernel, "decode": self.decode.to_dict(), "base": self.base.to_dict(),
            "prefill": self.prefill.to_dict(), "buckets": self.buckets.to_dict(),
            "alternatives": {k: v.to_dict() for k, v in self.alternatives.items()},
            "meta": self.meta, "samples": self.samples,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CostModel:
        return cls(
            model=d["model"], device=d["device"], dtype=d["dtype"], kernel=d["kernel"],
            decode=LinearFit.from_dict(d["decode"]), base=LinearFit.from_dict(d["base"]),
            prefill=LinearFit.from_dict(d["prefill"]), buckets=Buckets.from_dict(d.get("buckets")),
            alternatives={k: LinearFit.from_dict(v) for k, v in d.get("alternatives", {}).items()},
            meta=dict(d.get("meta", {})), samples=list(d.get("samples", [])),
        )  # fmt: skip

    def save(self, path: str | Path) -> None:
        """Write this model into ``path``, keeping the file's models with other keys."""
        p = Path(path)
        doc = {"format": FILE_FORMAT, "models": {}}
        if p.exists():
            doc = json.loads(p.read_text())
        doc["models"][self.key] = self.to_dict()
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(doc, indent=1) + "\n")

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        kernel: str | None = None,
    ) -> CostModel:
        """The one model in ``path`` matching the given key parts (None matches anything)."""
        want = {"model": model, "device": device, "dtype": dtype, "kernel": kernel}
        found = [
            m for m in load_cost_models(path).values()
            if all(v is None or getattr(m, k) == v for k, v in want.items())
        ]  # fmt: skip
        if len(found) != 1:
            keys = sorted(load_cost_models(path))
            raise KeyError(f"{len(found)} cost models in {path} match {want}; it holds {keys}")
        return found[0]


def model_key(model: str, device: str, dtype: str, kernel: str) -> str:
    return f"{model}|{device}|{dtype}|{kernel}"


def load_cost_models(path: str | Path) -> dict[str, CostModel]:
    """Every model of a cost-model JSON file, by key."""
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != FILE_FORMAT:
        raise ValueError(f"{path} is not a {FILE_FORMAT} file")
    return {k: CostModel.from_dict(v) for k, v in doc["models"].items()}


def fit_cost_model(
    samples: Sequence[Mapping[str, Any]],
    kernel: str,
    model: str,
    device: str,
    dtype: str,
    buckets: Buckets = Buckets(),
    meta: Mapping[str, Any] | None = None,
    min_gain: float = MIN_R2_GAIN,
) -> CostModel:
    """Fit one kernel's models from profiled samples.

    A sample is ``{"kind": "decode", "kernel": k, "ranks": [...], "latency_s": t}`` (ranks of
    the batch's rows, all 0 for a base-model step, whose kernel does not matter) or
    ``{"kind": "prefill", "lengths": [...], "ranks": [...], "latency_s": t}``. The decode model
    is fitted on this kernel's LoRA steps (paper form, plus ``batch`` if it gains ``min_gain``
    R^2), the base model on the base steps, the prefill model on the prefill steps.
    """
    lora, base, pre = [], [], []
    for s in samples:
        if s["kind"] == "prefill":
            pre.append(s)
        elif max(s["ranks"], default=0) <= 0:
            base.append(s)
        elif s.get("kernel") == kernel:
            lora.append(s)
    if not lora or not base or not pre:
        raise ValueError(
            f"need LoRA decode ({len(lora)}), base decode ({len(base)}) and prefill "
            f"({len(pre)}) samples for kernel {kernel}"
        )

    def dfeat(s: Mapping[str, Any]) -> dict[str, float]:
        r = s["ranks"]
        return decode_features(kernel, buckets, len(r), max(r), sum(r))

    def y(ss: Sequence[Mapping[str, Any]]) -> list[float]:
        return [float(s["latency_s"]) for s in ss]

    decode, tried = select_form([dfeat(s) for s in lora], y(lora), DECODE_CORE, DECODE_OPTIONAL,
                                min_gain)  # fmt: skip
    base_fit = fit_linear([dfeat(s) for s in base], y(base), BASE_FEATURES)
    pfeat = [prefill_features(buckets, s["lengths"], s["ranks"]) for s in pre]
    prefill, ptried = select_form(pfeat, y(pre), PREFILL_CORE, PREFILL_OPTIONAL, min_gain)
    alternatives = {f"decode:{k}": v for k, v in tried.items()}
    alternatives |= {f"prefill:{k}": v for k, v in ptried.items()}
    used = [s for s in samples if s["kind"] == "prefill" or s in lora or s in base]
    return CostModel(
        model, device, dtype, kernel, decode, base_fit, prefill, buckets, alternatives,
        dict(meta or {}), [dict(s) for s in used],
    )  # fmt: skip


def synthetic_gpu_cost_model(kernel: str) -> CostModel:
    """Coefficients resembling CaraServe's Llama2-7B / A100 numbers (no profiling needed).

    Base model: 22 ms + 0.12 ms per row (an assumption: memory-bound at small batches). LoRA
    decode = base + d + a * work, with d and a solved from the paper's two points per kernel
    (24 rows of rank 32: 34.8 ms BGMV / 35.3 ms MBGMV; 16 rows of rank 64: 35.8 / 35.9 ms).
    Prefill: 10 ms + 55 us a token (the same order as the paper's 44 ms for 256 tokens).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")
    c, b0 = 0.12e-3, 22e-3
    p1, p2 = (24, 32), (16, 64)
    y1, y2 = (34.8e-3, 35.8e-3) if kernel == "bgmv" else (35.3e-3, 35.9e-3)

    def work(p: tuple[int, int]) -> int:
        return p[0] * p[1]  # uniform ranks: |S| * max rank == sum of ranks

    a = ((y2 - b0 - c * p2[0]) - (y1 - b0 - c * p1[0])) / (work(p2) - work(p1))
    d = y1 - b0 - c * p1[0] - a * work(p1)
    return CostModel(
        model="synthetic-llama2-7b", device="synthetic-a100", dtype="float16", kernel=kernel,
        decode=LinearFit(("work", "batch", "one"), (a, c, b0 + d), 1.0),
        base=LinearFit(("batch", "one"), (c, b0), 1.0),
        prefill=LinearFit(("tokens", "lora_tokens", "one"), (55e-6, 2e-8, 10e-3), 1.0),
        meta={"source": "synthetic, after the CaraServe paper's A100 numbers"},
    )  # fmt: skip
