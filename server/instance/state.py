"""The leaf of the server package: the app key, the server's config, and the shape of the state
the handlers share.

Handlers, metrics, the adapter manager and the OpenAPI document read the state through
``AppState`` (a protocol), so none of them imports ``server.instance.app``; ``server.instance.app`` builds the
concrete ``ServerState`` and imports them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from aiohttp import web


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    served_names: tuple[str, ...]  # the first is reported; all are accepted as `model`
    model_root: str  # the base model's path, /v1/models' `root`
    api_key: str | None = None
    max_queue: int = 256  # waiting sequences at which new requests get 429
    lora_dir: str | None = None
    drain_timeout_s: float = 30.0
    tpot_slo_s: float | None = None
    cost_model: str | None = None  # kept for the scheduler; shown in /health
    retry_after_s: int = 1
    sse_keepalive_s: float = 5.0  # comment line on a stream that has been silent this long
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter: allowed when lora_dir confines
    # them or this is set (--allow-runtime-lora), refused otherwise (vLLM's rule)
    allow_runtime_lora: bool = False
    # how `tool_choice: auto` answers are parsed (tool_calls.PARSERS); None: by the template
    tool_call_parser: str | None = None
    # browser origins allowed to call the API (CORS); "*": any; empty: no CORS headers
    allowed_origins: tuple[str, ...] = ()

    @property
    def runtime_lora(self) -> bool:
        return self.lora_dir is not None or self.allow_runtime_lora


class AppState(Protocol):
    """What the handlers share (``server.instance.app.ServerState`` is the implementation)."""

    async_engine: Any  # cara_jax.api.AsyncEngine
    engine: Any  # cara_jax.engine.Engine
    config: ServerConfig
    tokenizer: Any
    max_len: int
    vocab: int
    token_text: Any  # server.instance.response_shapes.TokenText
    lora_dir: Any  # server.instance.lora_dir.LoraDir | None
    metrics: Any  # server.instance.metrics.Metrics
    adapters: Any  # server.instance.adapters.AdapterManager
    created: int
    draining: bool
    start_error: str | None
    warmup_mode: str
    active: int

    @property
    def ready(self) -> bool: ...

    @property
    def base_name(self) -> str: ...


STATE: web.AppKey[AppState] = web.AppKey("cara_state")
