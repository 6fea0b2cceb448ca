"""cara-jax: the continuous-batching Engine in-process, replayed in real time.

``start`` builds one Engine (cold-start mode, LoRA strategy, emulated link, host budget from the
options), registers every adapter, compiles every program (``warmup``: a handful, one per token
bucket), then serves a few untimed requests on separate warm-up adapters (first-use host costs;
their contents differ from the trace's adapters, so no trace adapter is warm unless ``cached``
preloaded it) and evicts them.
``replay`` adds each request at its arrival time between ``step()`` calls and takes the token
times from the engine's per-request records.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.lib.metrics import RequestResult
from bench.lib.workload import Trace
from bench.systems.common import (
    ALL_PROJECTIONS,
    ReplayClock,
    RunOptions,
    SystemUnavailable,
    cara_flags,
    compile_progress,
    progress_bar,
    run_system,
    write_adapters,
)

NAME = "cara-jax"


def _pow2_at_least(n: int, floor: int) -> int:
    p = floor
    while p < n:
        p *= 2
    return p


def _targets(path: Path) -> set[str]:
    return set(json.loads((Path(path) / "adapter_config.json").read_text())["target_modules"])


def _rank(path: Path) -> int:
    return int(json.loads((Path(path) / "adapter_config.json").read_text())["r"])


class CaraSystem:
    """The engine under one configuration; ``label`` names it in reports."""

    def __init__(self, opts: RunOptions | None = None, label: str | None = None) -> None:
        self.opts = opts or RunOptions()
        self.name = label or NAME
        self.engine = None
        self.info: dict[str, Any] = {}
        self._replays = 0
        self._tmp: tempfile.TemporaryDirectory | None = None

    # ---------------------------------------------------------------- start

    def _fitted_pool(self, pool_config, rows: int, per_row: int, n: int, top: int, projs):
        """A pool fitted to the trace's adapters (``server_pool=False``)."""
        from cara_jax.adapters.packed import default_cache_dir

        return pool_config(
            budget_bytes=rows * per_row, max_adapters=n + 2,
            max_rank=_pow2_at_least(top, floor=16), emulate_link_gbps=self.opts.link_gbps,
            cache_dir=str(default_cache_dir()), projections=projs,
        )  # fmt: skip

    def start(self, adapters: dict[str, Path], max_context: int) -> None:
        import dataclasses

        from cara_jax.adapters.device_pool import PoolConfig
        from cara_jax.embedded import default_model_path
        from cara_jax.engine import Engine
        from cara_jax.tokenizer import Tokenizer
        from cara_jax.weights import load_model
        from server.cli import build_parser, default_cost_model, engine_config

        o = self.opts
        path = default_model_path()
        loaded = load_model(path)
        ranks = {n: _rank(p) for n, p in adapters.items()}
        targets = set().union(*(_targets(p) for p in adapters.values())) if adapters else set()
        warm_ranks = sorted(set(ranks.values())) or [8]
        warm = {f"_warmup{i}": r for i, r in enumerate(warm_ranks)}
        # The engine cara-serve would build with these flags (none: its defaults), through its
        # own parser, so the bench cannot drift from what a user of the server gets.
        flags = cara_flags(o)
        args = build_parser().parse_args(flags)
        default_cost_model(args)  # the packaged cost model, as cara-serve applies it
        cfg = engine_config(args)
        self.info["flags"] = " ".join(flags) or "defaults"
        self.info["pool"] = "server default"
        pool = cfg.pool
        shapes = loaded.cfg.projection_shapes()
        all_rows = pool.budget_bytes // (sum(sum(v) for v in shapes.values())
                                         * loaded.cfg.num_layers * 4)  # fmt: skip
        cached = cfg.cold_start == "cached"
        too_big = cached and (sum(ranks.values()) > all_rows or len(adapters) >= pool.max_adapters)
        if not o.server_pool or too_big:  # cached pins every adapter: they must all fit
            # only the targeted projections; room for every adapter, or (not cached) for what
            # three full batches of the largest rank need (beyond that, LRU eviction)
            projs = tuple(p for p in shapes if p in targets) or tuple(shapes)
            per_row = sum(sum(shapes[p]) for p in projs) * loaded.cfg.num_layers * 4
            top = max(ranks.values(), default=16)
            rows = sum(ranks.values()) + sum(warm.values()) + 64
            n_adapters = len(adapters) + len(warm)
            if not cached:
                rows = min(rows, 3 * cfg.max_num_seqs * top + sum(warm.values()))
                n_adapters = min(n_adapters, 3 * cfg.max_num_seqs + len(warm))
            if o.pool_rows:  # a fixed shape, or the next power of two that fits
                rows = o.pool_rows if rows <= o.pool_rows else _pow2_at_least(rows, o.pool_rows)
            if o.pool_slots:
                n_adapters = max(o.pool_slots, _pow2_at_least(n_adapters + 2, 16)) - 2
            self.info["pool"] = "fitted to the trace's adapters" + (
                " (they do not fit the server's default pool, which cached mode pins)"
                if o.server_pool else "")  # fmt: skip
            pool = self._fitted_pool(PoolConfig, rows, per_row, n_adapters, top, projs)
        cfg = dataclasses.replace(cfg, pool=pool)
        try:
            eng = Engine(loaded, Tokenizer.from_path(path), cfg)
        except ImportError as e:  # e.g. cpu_assist's worker package missing
            raise SystemUnavailable(
                f"{self.name}: cold_start={cfg.cold_start} unavailable: {e}"
            ) from e
        self.engine = eng
        t = time.perf_counter()
        for name, p in adapters.items():
            eng.load_adapter(name, p)
        self.info["adapter_load_s"] = time.perf_counter() - t
        t = time.perf_counter()
        eng.warmup(progress=compile_progress(o.progress, f"{self.name} compiling"))
        self.info["warmup_compile_s"] = time.perf_counter() - t
        st = eng.stats()
        self.info["programs"] = st.compiled_programs
        self.info["kv_pages"] = st.kv_pages_total
        self.info["kv_cache_bytes"] = st.kv_cache_bytes
        self._warm_up(warm, max_context, loaded.cfg, tuple(sorted(targets)))

    def _warm_up(self, warm: dict[str, int], max_context: int, cfg, targets) -> None:
        """Untimed requests on throw-away adapters, then drop those adapters again."""
        from cara_jax.sampling_params import SamplingParams

        n = self.opts.warmup_requests
        if n <= 0:
            return
        eng = self.engine
        if self.engine.config.cold_start == "cached":  # the trace's adapters are resident (pinned) anyway
            dirs = {}
            names = sorted(eng.registry.names()) or [None]
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="cara-bench-warm-")
            dirs = write_adapters(
                Path(self._tmp.name), warm, cfg, targets or ALL_PROJECTIONS, seed=7919
            )
            for name, p in dirs.items():
                eng.load_adapter(name, p)
            names = list(dirs)
        plen = max(1, min(64, max_context // 2))
        sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        t = time.perf_counter()
        for i in range(n):
            prompt = [100 + (7 * i + j) % 1000 for j in range(plen - (i % 4) * plen // 5)]
            eng.add_request(prompt, sp, names[i % len(names)], request_id=f"warm-{i}")
        while eng.has_unfinished():
            eng.step()
        self.info["warmup_requests_s"] = time.perf_counter() - t
        for name in dirs:
            h = eng.registry.entry(name).content_hash
            eng.unload_adapter(name)
            try:
                eng.pool.evict(h)
            except Exception:  # still referenced: it just stays until LRU drops it
                pass
        eng.finished_requests.clear()
        eng.steps.clear()

    # ---------------------------------------------------------------- replay

    def replay(self, trace: Trace, desc: str = "") -> list[RequestResult]:
        from cara_jax.sampling_params import SamplingParams

        eng = self.engine
        if eng is None:
            raise RuntimeError("start() first")
        self._replays += 1
        tag = f"p{self._replays}-"
        reqs = trace.requests
        errors: dict[str, str] = {}
        compiled = eng.runner.compiled_count()
        hot = eng.runner.hot_compiles
        cpu0 = eng.cpu_stats if eng.config.cold_start in ("cpu_assist", "auto") else None
        bar = progress_bar(len(reqs), desc or self.name, self.opts.progress)
        clock = ReplayClock(trace)
        while clock.pending() or eng.has_unfinished():
            for i in clock.due():
                r = reqs[i]
                sp = SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True)
                try:
                    eng.add_request(r.prompt, sp, r.adapter, request_id=tag + r.id)
                except Exception as e:  # invalid request: fails alone, as a server answers it
                    errors[r.id] = f"{type(e).__name__}: {e}"
                    bar.update()
            if not eng.has_unfinished():
                clock.sleep_until_next()
                continue
            for out in eng.step():
                if out.finished:
                    bar.update()
                    if out.error:
                        errors[out.request_id[len(tag) :]] = out.error
        bar.close()
        records = {
            rec.request_id[len(tag) :]: rec
            for rec in eng.finished_requests
            if rec.request_id.startswith(tag)
        }
        self.info["compiles_during_replay"] = eng.runner.compiled_count() - compiled
        self.info["hot_compiles_during_replay"] = eng.runner.hot_compiles - hot
        if cpu0 is not None:  # this replay's share of the engine's cumulative counters
            cpu1 = eng.cpu_stats
            gauges = ("_workers", "_adapters", "_adapter_bytes", "_flops_per_s")
            self.info["cpu_assist"] = {
                k: v if k.endswith(gauges) else v - cpu0.get(k, 0) for k, v in cpu1.items()
            }
        out = []
        for r in reqs:
            rec = records.get(r.id)
            if rec is None:
                out.append(
                    RequestResult(
                        r.id,
                        r.arrival,
                        [],
                        False,
                        errors.get(r.id, "no record"),
                        r.adapter,
                        r.rank,
                        None,
                        len(r.prompt),
                    )
                )
                continue
            ok = rec.finish_reason not in ("error", "abort", None)
            out.append(
                RequestResult(
                    r.id,
                    r.arrival,
                    [t - clock.t0 for t in rec.token_times],
                    ok,
                    None if ok else errors.get(r.id, f"finish_reason={rec.finish_reason}"),
                    r.adapter,
                    rec.rank or r.rank,
                    rec.cold,
                    rec.prompt_tokens,
                )
            )
        return out

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
            # XLA:CPU maps memory regions for every compiled program; free the first engine's
            # executables before a second engine in the same process compiles its own
            import gc

            import jax

            gc.collect()
            jax.clear_caches()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def run(
    trace: Trace, adapters: dict[str, Path], opts: RunOptions | None = None
) -> list[RequestResult]:
    return run_system(CaraSystem(opts), trace, adapters, opts)
