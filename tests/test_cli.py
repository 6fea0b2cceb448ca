"""The generate CLI as a real process on the embedded model."""

from __future__ import annotations

import os
import subprocess
import sys


def test_cli_generate_chat_answers_paris():
    env = dict(os.environ)
    out = subprocess.run(
        [sys.executable, "-m", "cara_jax.cli", "generate", "--chat", "--prompt",
         "What is the capital of France?", "--max-tokens", "24", "--max-len", "128"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "finish_reason=stop" in out.stderr


def test_cli_prompt_too_long_is_a_clear_error():
    out = subprocess.run(
        [sys.executable, "-m", "cara_jax.cli", "generate", "--prompt", "word " * 100, "--max-len", "32"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2
    assert "does not fit the context" in out.stderr
