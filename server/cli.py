"""`cara-serve`: the OpenAI-compatible multi-LoRA server (see docs/server.md for every flag)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path

from server.flags import build_parser, byte_size, lora_spec, positive  # noqa: F401  (re-exported)

log = logging.getLogger("cara_serve")

COMPILE_CACHE_KEYS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


def _default_cache() -> Path:
    root = os.environ.get("CARA_JAX_CACHE") or Path.home() / ".cache" / "cara_jax"
    return Path(root).expanduser() / "xla"


def _adapter_cache(folder: str | None) -> str | None:
    """Folder of the adapters' packed copies (the device layout, memory-mapped), or None."""
    from cara_jax.adapters.packed import default_cache_dir

    if folder is not None and folder.lower() == "none":
        return None
    return str(folder or default_cache_dir())


def _use_compile_cache(folder: str | None) -> None:
    """Keep compiled step variants on disk (process-wide JAX setting; the server owns it)."""
    folder = folder or str(_default_cache())
    if folder.lower() == "none":
        return
    import jax

    Path(folder).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def engine_config(args: argparse.Namespace):
    """EngineConfig from the flags; fields the engine does not have yet are kept by the server."""
    from cara_jax.adapters.device_pool import PoolConfig
    from cara_jax.engine import EngineConfig
    from cara_jax.engine.admission_order import AdmissionSettings

    cfg = dict(
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens or default_token_budget(),
        max_prefill_seqs=args.max_prefill_seqs,
        token_buckets=args.token_buckets,
        kv_cache_memory=args.kv_cache_memory,
        block_size=args.block_size,
        enable_prefix_caching=args.prefix_caching,
        cold_start=args.cold_start,
        cpu_workers=args.cpu_workers,
        lora_strategy=args.lora_kernel,
        max_lora_entries=args.max_lora_entries,
        host_budget_bytes=args.host_lora_bytes,
        pool=PoolConfig(
            budget_bytes=args.device_lora_bytes,
            max_adapters=args.max_loras + 1,  # pool slot 0 is the base model
            max_rank=args.max_lora_rank,
            dora_slots=max(0, args.max_dora_loras),
            vocab_rows=max(0, args.max_vocab_lora_rows),
            cache_dir=_adapter_cache(args.adapter_cache),
            emulate_link_gbps=args.emulate_link_gbps,
        ),
    )
    admission = args.admission
    if admission == "auto":
        admission = "slo" if args.cost_model else "fifo"
    if admission == "slo" and not args.cost_model:
        raise SystemExit("cara-serve: --admission slo needs --cost-model FILE (cara-jax profile)")
    cfg["admission"] = AdmissionSettings(
        admission=admission,
        cost_model=args.cost_model,
        tpot_slo=args.tpot_slo,
        max_wait_s=args.max_wait,
    )
    return EngineConfig(**cfg)


def build_state(args: argparse.Namespace):
    """Load the model, build the engine, register adapters, warm up: a ServerState to serve."""

    from cara_jax.api import AsyncEngine
    from cara_jax.embedded import default_model_path
    from cara_jax.engine import Engine
    from cara_jax.tokenizer import Tokenizer
    from cara_jax.weights import DTYPES, load_model
    from server.demo import demo_adapters
    from server.instance.app import ServerConfig, ServerState, default_served_names

    if args.cost_model and not Path(args.cost_model).is_file():
        raise SystemExit(f"cara-serve: --cost-model {args.cost_model} is not a file")
    _use_compile_cache(args.compile_cache)
    path = Path(args.model) if args.model else default_model_path()
    names = tuple(args.served_model_name or default_served_names(args.model))
    t0 = time.perf_counter()
    dtype = args.dtype
    if dtype == "auto":
        import jax

        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    loaded = load_model(path, dtype=DTYPES[dtype])
    try:
        engine = Engine(loaded, Tokenizer.from_path(path), engine_config(args))
    except ValueError as e:  # e.g. an unknown --cold-start mode
        raise SystemExit(f"cara-serve: {e}") from e
    log.info("model %s loaded in %.1fs", path, time.perf_counter() - t0)

    config = ServerConfig(
        served_names=names,
        model_root=str(path),
        api_key=args.api_key or None,
        max_queue=args.max_queue,
        lora_dir=args.lora_dir,
        drain_timeout_s=args.drain_timeout,
        tpot_slo_s=args.tpot_slo,
        cost_model=args.cost_model,
        sse_keepalive_s=args.sse_keepalive,
        allow_runtime_lora=args.allow_runtime_lora,
        tool_call_parser=args.tool_call_parser,
        allowed_origins=tuple(args.allowed_origins),
    )
    state = ServerState(AsyncEngine(engine), config)
    adapters = dict(args.lora)
    if args.demo_adapters > 0:
        adapters.update(
            {
                k: str(v)
                for k, v in demo_adapters(loaded.cfg, args.demo_adapters, args.demo_rank).items()
            }
        )
    for name, p in adapters.items():
        if name in names:
            raise SystemExit(f"cara-serve: adapter name {name!r} is the base model's name")
        t = time.perf_counter()
        try:
            entry = engine.load_adapter(name, p)
        except (ValueError, OSError) as e:
            raise SystemExit(f"cara-serve: adapter {name} ({p}): {e}") from e
        state.metrics.lora_load.labels(name).observe(time.perf_counter() - t)
        log.info("adapter %s: %s (rank %d)", name, p, entry.max_rank)

    state.warmup_mode = args.warmup
    return state


def default_token_budget() -> int:
    import jax

    return 256 if jax.default_backend() == "cpu" else 2048


def start_warmup(state) -> threading.Thread | None:
    """Compile every program in the background; /health says "starting" until it is done."""
    engine = state.engine
    if getattr(state, "warmup_mode", "full") == "none":
        state.mark_ready()
        return None
    programs = engine.programs()
    log.info("compiling %d programs (token buckets %s) before reporting healthy", len(programs),
             ",".join(str(t) for t in sorted({p.tokens for p in programs})))  # fmt: skip
    t0 = time.perf_counter()

    def progress(done: int, total: int, program) -> None:
        log.info("compiled %d/%d (%d tokens%s) after %.1fs", done, total, program.tokens,
                 ", CPU assist" if program.cpu else "", time.perf_counter() - t0)  # fmt: skip

    def run() -> None:
        try:
            engine.warmup(progress=progress)
        except Exception:
            log.exception("compiling the programs failed")
            state.start_error = "compiling the programs failed (see the log)"
            return
        log.info("ready: %d programs compiled in %.1fs", len(programs), time.perf_counter() - t0)
        state.mark_ready()

    th = threading.Thread(target=run, name="cara-warmup", daemon=True)
    th.start()
    return th


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _cpu_only() -> bool:
    """Whether JAX will run on the CPU here, without starting JAX (which would take an
    accelerator's memory in a process that does not serve)."""
    import importlib.util
    import os

    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return True
    plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu")
    return not any(importlib.util.find_spec(m) for m in plugins)


def default_cost_model(args: argparse.Namespace) -> None:
    """With no --cost-model: the embedded model's packaged one when serving it in float32 on a
    CPU (rank-aware admission and routing then need no flag); for another model, a fleet's
    rank_aware router falls back to Ray's default router, saying how to profile."""
    if args.cost_model is None and args.model is None and args.dtype in ("auto", "float32"):
        from cara_jax.embedded import packaged_cost_model

        if _cpu_only() and packaged_cost_model().is_file():
            args.cost_model = str(packaged_cost_model())
            log.info("cost model: %s (the embedded model's, packaged)", args.cost_model)
    if args.replicas is not None and args.ray_router == "rank_aware" and not args.cost_model:
        log.warning("no cost model for this model and device: routing with power_of_two (Ray "
                    "Serve's default); run `cara-jax profile --out FILE` and pass --cost-model "
                    "FILE for rank-aware routing")  # fmt: skip
        args.ray_router = "power_of_two"



def fleet_config(args: argparse.Namespace):
    """The Ray Serve fleet of ``--replicas N`` (server/fleet/serve.py), from the flags."""
    from server.fleet.serve import FleetConfig

    engine_args = argparse.Namespace(**vars(args))
    engine_args.replicas = None
    return FleetConfig(
        engine_args=engine_args,
        build_state=build_state,
        start_warmup=start_warmup,
        replicas=args.replicas,
        router=args.ray_router,
        avg_response_len=args.avg_response_len,
        replica_cpus=args.replica_cpus,
        pin_cpus=args.pin_cpus,
        api_key=args.api_key or None,
    )


def ray_serve_missing() -> str | None:
    """What of Ray Serve is not installed (None: all of it)."""
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        return "Ray Serve"
    try:
        import starlette  # noqa: F401
    except ImportError:
        return "Ray Serve's HTTP extras"
    return None


def warn_if_exposed(host: str, api_key: str | None) -> bool:
    """Warn when the server listens beyond loopback without an API key (True if it did)."""
    if api_key or host in LOOPBACK or host.startswith("127."):
        return False
    log.warning(
        "listening on %s without an API key: anyone who can reach this port can generate "
        "(and load adapters if runtime loads are allowed); set --api-key or CARA_API_KEY",
        host,
    )
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for name in ("cara_serve", "server", "cara_jax", "aiohttp.access"):  # not absl/jax chatter
        logging.getLogger(name).setLevel(args.log_level.upper())
    warn_if_exposed(args.host, args.api_key)
    if args.replicas is not None and (missing := ray_serve_missing()):
        print(f"cara-serve: --replicas needs {missing}: pip install 'cara-jax[ray]' "
              "(or pip install 'ray[serve]')", file=sys.stderr)  # fmt: skip
        return 2
    default_cost_model(args)
    if args.replicas is not None:
        from server.fleet.serve import run_fleet

        return run_fleet(fleet_config(args), args.host, args.port, args.ray_address)
    from aiohttp import web

    from server.instance.app import build_app

    state = build_state(args)
    start_warmup(state)
    app = build_app(state)
    adapters = sorted(state.adapters.registered())
    log.info(
        "serving %s%s on http://%s:%d (OpenAPI at /openapi.json)",
        state.base_name,
        f" + adapters {', '.join(adapters)}" if adapters else "",
        args.host,
        args.port,
    )
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        shutdown_timeout=args.drain_timeout + 5,
        handler_cancellation=True,
        access_log=logging.getLogger("aiohttp.access") if args.access_log else None,
        print=None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
