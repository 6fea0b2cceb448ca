"""Which waiting requests the scheduler tries to admit at a step: FIFO, or rank-aware by TPOT SLO.

Why a separate concept: the scheduler knows KV pages, adapters and loads; admission only decides
the order and the subset to try. ``fifo`` tries every waiting request in arrival order (what
vLLM does). ``slo`` asks ``AdmissionPolicy`` (scheduling/admission.py) with the profiled cost
model: a request joins only if the predicted decode step of the batch it makes keeps every
request in that batch inside its time-per-output-token SLO; aging admits a request that has
waited ``max_wait_s`` whatever its rank, so a large rank never starves.

The scheduler then checks each chosen request's adapter: one still loading stays waiting (its load
proceeds) and is chosen again at a later step.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from pathlib import Path

from cara_jax.engine.sequence import Sequence
from cara_jax.scheduling.admission import (
    AdmissionConfig,
    AdmissionPolicy,
    RunningInfo,
    WaitingInfo,
)
from cara_jax.scheduling.cost_model import DEFAULT_SLO_FACTOR, CostModel, load_cost_models

ADMISSION_MODES = ("fifo", "slo")


@dataclasses.dataclass(frozen=True)
class AdmissionSettings:
    admission: str = "fifo"  # fifo | slo
    cost_model: str | Path | CostModel | None = None  # needed by slo
    tpot_slo: float | None = None  # default per-request SLO (None: slo_factor x base step)
    slo_factor: float = DEFAULT_SLO_FACTOR
    headroom: float = 0.0
    max_wait_s: float = 2.0  # aging bound
    avg_response_len: float | None = None  # count prefill stalls in the predicted TPOT


def load_engine_cost_model(
    source: str | Path | CostModel, kernel: str, device: str | None = None
) -> CostModel:
    """The cost model for ``kernel`` in a file (or the given model, checked for its kernel).

    A file may hold models of several devices: with more than one match for the kernel, the
    ``device`` (e.g. jax.default_backend()) decides.
    """
    if isinstance(source, CostModel):
        model = source
    else:
        models = [m for m in load_cost_models(source).values() if m.kernel == kernel]
        if len(models) > 1 and device is not None:
            models = [m for m in models if m.device == device] or models
        if len(models) != 1:
            raise ValueError(
                f"{source}: {len(models)} cost models for kernel {kernel!r}"
                + (f" and device {device!r}" if device else "")
                + "; profile one with `cara-jax profile`"
            )
        model = models[0]
    if model.kernel != kernel:
        raise ValueError(
            f"the cost model is for kernel {model.kernel!r}, the engine runs {kernel!r}"
        )
    return model


class AdmissionOrder:
    """Chooses the waiting requests to try this step; counts what the SLO rule held back."""

    def __init__(self, config: AdmissionSettings, kernel: str, device: str | None = None) -> None:
        if config.admission not in ADMISSION_MODES:
            raise ValueError(
                f"admission must be one of {ADMISSION_MODES}, not {config.admission!r}"
            )
        self.config = config
        self.cost: CostModel | None = None
        self.policy: AdmissionPolicy | None = None
        if config.cost_model is not None:
            self.cost = load_engine_cost_model(config.cost_model, kernel, device)
        if config.admission == "slo":
            if self.cost is None:
                raise ValueError(
                    "admission 'slo' needs a cost model: run `cara-jax profile --out FILE` and "
                    "pass it as cost_model"
                )
            self.policy = AdmissionPolicy(
                self.cost,
                AdmissionConfig(
                    slo_factor=config.slo_factor,
                    headroom=config.headroom,
                    max_wait_s=config.max_wait_s,
                    avg_response_len=config.avg_response_len,
                ),
            )
        self.stats = {
            "cara_admission_deferred_total": 0,  # request-steps held back by the SLO rule
            "cara_admission_forced_total": 0,  # admitted by aging or into an empty batch
            "cara_admission_aged_total": 0,  # admitted by aging alone
        }

    def slo_of(self, seq: Sequence) -> float | None:
        """A request's TPOT SLO: its own, else the engine default (None: the cost model's)."""
        return seq.params.tpot_slo if seq.params.tpot_slo is not None else self.config.tpot_slo

    def default_slo(self, batch: int) -> float | None:
        """The SLO of a request without one, at a batch size (None without a cost model)."""
        if self.config.tpot_slo is not None:
            return self.config.tpot_slo
        if self.cost is None:
            return None
        return self.cost.default_slo(max(batch, 1), self.config.slo_factor)

    def candidates(
        self,
        running: Iterable[Sequence],
        waiting: Seq[Sequence],
        free_slots: int,
        max_new: int,
        now: float | None = None,
    ) -> list[Sequence]:
        """The waiting requests to try, in prefill order (FIFO: all of them, in order)."""
        if self.policy is None or not waiting:
            return list(waiting)
        now = time.perf_counter() if now is None else now
        run = [RunningInfo(s.rank, self.slo_of(s), len(s.prompt_ids)) for s in running]
        wait = [
            WaitingInfo(i, s.rank, s.arrival, self.slo_of(s), len(s.prompt_ids))
            for i, s in enumerate(waiting)
        ]
        d = self.policy.select(run, wait, free_slots=free_slots, now=now, max_new=max_new)
        cap = min(free_slots, max_new, len(waiting))
        self.stats["cara_admission_deferred_total"] += cap - len(d.admitted)
        self.stats["cara_admission_forced_total"] += len(d.forced)
        self.stats["cara_admission_aged_total"] += len(d.aged)
        return [waiting[i] for i in d.admitted]
