"""The README's Python examples run as written (given a real PEFT folder for `adapter_dir`)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(_blocks()) >= 3


@pytest.mark.slow  # CI time: the default engine compiles every bucket; the CLI and server tests run the same path
def test_python_api_example(capsys):
    block = next(b for b in _blocks() if "from cara_jax import LLM" in b)
    exec(compile(block, "README-api", "exec"), {})  # noqa: S102
    out = capsys.readouterr().out
    assert "Paris" in out


@pytest.mark.slow  # CI time; PEFT parity stays in the fast set (tiny model, and SmolLM2 through the server)
def test_multi_lora_example(hf_smollm, tmp_path):
    import copy

    from tests.helpers import make_peft_adapters

    # The example runs on SmolLM2, so its adapter is a real PEFT adapter for SmolLM2.
    spec = {"ex": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])}
    paths = make_peft_adapters(lambda: copy.deepcopy(hf_smollm), tmp_path, spec)
    ns = {"adapter_dir": paths["ex"]}
    block = next(b for b in _blocks() if "adapter_dir" in b)
    exec(compile(block, "README-example-1", "exec"), ns)  # noqa: S102
    outs = ns["outs"]
    assert len(outs) == 2 and all(o.token_ids for o in outs)


def test_functional_example():
    ns: dict = {}
    block = next(b for b in _blocks() if "multi_lora_delta" in b)
    exec(compile(block, "README-example-2", "exec"), ns)  # noqa: S102
    y = np.asarray(ns["y"])
    a, b, w = (np.asarray(ns[k]) for k in ("a", "b", "w"))
    x = np.ones(64, np.float32)
    np.testing.assert_allclose(y[1, 0], x @ w, rtol=1e-4)  # row without adapter
    np.testing.assert_allclose(y[2, 0], x @ w + x @ a[1:9].T @ b[1:9], rtol=1e-4)
    np.testing.assert_allclose(y[0, 0], x @ w + x @ a[9:25].T @ b[9:25], rtol=1e-4)
