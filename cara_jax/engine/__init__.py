"""The serving engine: scheduler (queues, KV pages, adapters), runner (programs), the loop.

One concept per module: ``config`` (EngineConfig), ``sequence`` (a request's life),
``block_manager`` (KV pages), ``admission`` (FIFO or SLO-aware choice of waiting requests),
``scheduler`` (the token-budget step), ``batch`` (records at the scheduler/runner seam),
``step`` (the jitted program), ``runner`` (device inputs and compiled programs), ``records``
(instrumentation), ``engine`` (the loop).
"""

from cara_jax.engine.config import COLD_START_MODES, EngineConfig
from cara_jax.engine.engine import Engine
from cara_jax.engine.errors import EngineClosedError, PromptTooLongError
from cara_jax.engine.records import EngineStats, RequestRecord, StepRecord

__all__ = [
    "COLD_START_MODES", "Engine", "EngineClosedError", "EngineConfig", "EngineStats",
    "PromptTooLongError", "RequestRecord", "StepRecord",
]  # fmt: skip
