"""The fleet's configuration and its adapter book: the runtime adapter changes every replica
applies (a small detached Ray actor, one per application)."""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import ray

ENGINE = "EngineReplica"
BOOK = "cara-adapter-book"
HEARTBEAT_S = 0.5
LIVE_S = 5.0  # a replica heard from this recently is live
PASS_HEADERS = ("Content-Type", "Retry-After", "WWW-Authenticate", "Cache-Control",
                "X-Accel-Buffering")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    """What ``cara-serve --replicas`` deploys (the engine flags travel as ``engine_args``)."""

    engine_args: argparse.Namespace
    # (engine_args) -> a ServerState, and (state) -> start compiling: cara-serve's own
    # (server/cli.py build_state, start_warmup), passed in by reference
    build_state: Callable[[argparse.Namespace], Any]
    start_warmup: Callable[[Any], Any]
    replicas: int = 2
    router: str = "rank_aware"  # rank_aware | least_loaded | round_robin | power_of_two
    avg_response_len: float = 128.0
    replica_cpus: float = 1.0
    pin_cpus: bool = False
    api_key: str | None = None
    stats_period_s: float = 0.2  # how often Ray's controller collects routing stats
    request_timeout_s: float = 600.0
    app_name: str = "cara"


# ---------------------------------------------------------------------------- adapter book


@ray.remote(num_cpus=0)
class AdapterBook:
    """Runtime adapter changes (name -> resolved path, or None: unloaded) and what each
    replica has applied; replicas report here every heartbeat."""

    def __init__(self) -> None:
        self.version = 0
        self.changes: dict[str, str | None] = {}
        self.replicas: dict[str, dict] = {}

    def change(self, name: str, path: str | None) -> int:
        self.version += 1
        self.changes[name] = path
        return self.version

    def heartbeat(self, replica: str, report: dict) -> tuple[int, dict[str, str | None]]:
        report["seen"] = time.time()
        if "metrics" not in report and replica in self.replicas:  # sent every few beats
            report["metrics"] = self.replicas[replica].get("metrics")
        self.replicas[replica] = report
        return self.version, dict(self.changes)

    def forget(self, replica: str) -> None:
        self.replicas.pop(replica, None)

    def state(self) -> tuple[int, dict[str, dict]]:
        now = time.time()
        live = {k: v for k, v in self.replicas.items() if now - v["seen"] < LIVE_S}
        for k in [k for k, v in self.replicas.items() if now - v["seen"] > 60]:
            del self.replicas[k]
        return self.version, live


def _book(app_name: str):
    return AdapterBook.options(
        name=f"{BOOK}-{app_name}", namespace="serve", get_if_exists=True, lifetime="detached"
    ).remote()
