"""The aiohttp application: state, middlewares (errors, auth, request counts), shutdown.

Several apps may share one ``AsyncEngine`` (each with its own config and metrics registry); only
the app that owns the engine shuts it down.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from pathlib import Path

from aiohttp import web

from cara_jax.api import AsyncEngine
from server.instance.adapters import AdapterManager
from server.instance.lora_dir import LoraDir
from server.instance.metrics import Metrics
from server.instance.response_shapes import TokenText
from server.instance.state import STATE, ServerConfig
from server.middleware import (
    auth_middleware,
    cors_headers,
    cors_middleware,
    echo_request_id,
    error_middleware,
)
from server.protocol import ApiError

log = logging.getLogger(__name__)
MAX_BODY = 16 << 20
__all__ = ["STATE", "BackgroundServer", "ServerConfig", "ServerState", "build_app"]


class ServerState:
    """What the handlers share: the engine, its tokenizer, adapters, metrics, drain state."""

    def __init__(
        self, async_engine: AsyncEngine, config: ServerConfig, owns_engine: bool = True
    ) -> None:
        self.async_engine = async_engine
        self.engine = async_engine.engine
        self.config = config
        self.owns_engine = owns_engine
        self.tokenizer = self.engine.tokenizer
        self.max_len = self.engine.max_len
        self.vocab = self.engine.loaded.cfg.vocab_size
        self.token_text = TokenText(self.tokenizer)
        self.lora_dir = LoraDir(config.lora_dir) if config.lora_dir else None
        self.metrics = Metrics(self)
        self.adapters = AdapterManager(self)
        self.created = int(time.time())
        self.draining = False
        # healthy means ready: every program compiled (server/cli.py start_warmup); until then
        # /health answers 503 "starting" and generation requests 503 with Retry-After
        self._ready = False
        self.start_error: str | None = None
        self.warmup_mode = "full"
        self.active = 0  # generation requests in flight on this app

    def mark_ready(self) -> None:
        self._ready = True

    @property
    def ready(self) -> bool:
        return self._ready or self.engine.is_ready()

    @property
    def base_name(self) -> str:
        return self.config.served_names[0]


def json_error(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers=err.headers)


def _count(request: web.Request, endpoint: str, status: str) -> None:
    request.app[STATE].metrics.requests.labels(endpoint, status).inc()


def _api_key(request: web.Request) -> str | None:
    return request.app[STATE].config.api_key


def _origins(request: web.Request) -> tuple[str, ...]:
    return request.app[STATE].config.allowed_origins


async def _drain(app: web.Application) -> None:
    """Stop taking generation requests and wait (bounded) for the running ones to finish."""
    state = app[STATE]
    state.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + state.config.drain_timeout_s
    if state.active:
        log.info("draining %d requests (up to %.0fs)", state.active, state.config.drain_timeout_s)
    while state.active and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if state.active:
        log.warning("%d requests still running after the drain timeout", state.active)


async def _close_engine(app: web.Application) -> None:
    state = app[STATE]
    if state.owns_engine:
        await asyncio.to_thread(state.async_engine.shutdown)


def build_app(state: ServerState) -> web.Application:
    from server.instance.routes import add_routes

    middlewares = [cors_middleware(_origins), error_middleware(_count), auth_middleware(_api_key)]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
    app.on_response_prepare.append(echo_request_id)
    app.on_response_prepare.append(cors_headers(_origins))
    app[STATE] = state
    add_routes(app)
    app.on_shutdown.append(_drain)
    app.on_cleanup.append(_close_engine)
    return app


class BackgroundServer:
    """Serve an app from a thread with its own event loop (tests, benches, embedding)."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self._sock = socket.create_server((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{host}:{self.port}"
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._run, name="cara-http", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        self._loop = loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        shutdown = self.app[STATE].config.drain_timeout_s + 5
        self._runner = web.AppRunner(
            self.app, handler_cancellation=True, shutdown_timeout=shutdown, access_log=None
        )
        loop.run_until_complete(self._runner.setup())
        loop.run_until_complete(web.SockSite(self._runner, self._sock).start())
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def stop(self) -> None:
        """Graceful: stop listening, drain (bounded), clean up."""
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()


def default_served_names(model: str | Path | None) -> tuple[str, ...]:
    """The embedded model answers to its model id, its HF id and its package name; a path to
    its folder name (a GGUF file: its stem)."""
    from cara_jax.embedded import DEFAULT_MODEL_ID, DEFAULT_MODEL_PACKAGE

    if model is None:
        return (
            DEFAULT_MODEL_ID,
            f"HuggingFaceTB/{DEFAULT_MODEL_ID}",
            DEFAULT_MODEL_PACKAGE.replace("_", "-"),
        )
    p = Path(model)
    return (p.stem if p.suffix == ".gguf" else p.resolve().name,)
