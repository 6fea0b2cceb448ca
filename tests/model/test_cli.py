"""The generate CLI as a real process on the embedded model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.slow  # CI time (36 s); chat on the real model stays fast through the server (server/test_server.py)
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


def test_generate_tokens_queues_prompts_beyond_the_rows(tiny, smollm_path):
    """Offline generation drives the engine: more prompts than sequence rows wait their turn,
    batching changes no greedy result, and the foreseen program is the only one compiled."""
    from cara_jax.generate import compile_for_prompts, generate_tokens, offline_engine
    from cara_jax.tokenizer import Tokenizer

    eng = offline_engine(tiny, Tokenizer.from_path(smollm_path), max_model_len=64, num_seqs=2,
                         max_num_batched_tokens=16, min_token_bucket=16)  # fmt: skip
    prompts = [[5, 6, 7], list(range(10, 30)), [40, 41, 42, 43, 44]]
    assert [p.tokens for p in compile_for_prompts(eng, [len(p) for p in prompts])] == [16]
    streamed: list[tuple[int, int]] = []
    outs = generate_tokens(eng, prompts, 5, stop_ids=frozenset(),
                           on_token=lambda i, t: streamed.append((i, t)))  # fmt: skip
    assert [len(o.token_ids) for o in outs] == [5, 5, 5]
    assert {o.finish_reason for o in outs} == {"length"}
    for i, o in enumerate(outs):
        assert [t for j, t in streamed if j == i] == o.token_ids
        assert (
            generate_tokens(eng, [prompts[i]], 5, stop_ids=frozenset())[0].token_ids == o.token_ids
        )
    assert eng.runner.hot_compiles == 0 and not eng.has_unfinished()
    eng.close()
