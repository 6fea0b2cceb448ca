"""Typed errors of the engine's API."""

from __future__ import annotations


class PromptTooLongError(ValueError):
    """A prompt (plus at least one generated token) does not fit the context."""


class EngineClosedError(RuntimeError):
    """The engine is shut down: it takes no new requests."""
