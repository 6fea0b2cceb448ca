"""Shared fixtures: the real SmolLM2 model (ours and HF's reference) and a random HF Llama."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep converted-parameter caches inside the test session, never in the user's home.
os.environ.setdefault("CARA_JAX_CACHE", str(Path(__file__).parent / ".cache"))


def _compile_cache() -> None:
    """One persistent compile cache (and stored programs, engine/program_store.py) for the
    session: engines of the same shape in different tests compile their programs once."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(os.environ["CARA_JAX_CACHE"]) / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


_compile_cache()


def _share_programs() -> None:
    """Engines of one geometry in one test process share their compiled programs
    (engine/program_store.py ProcessPrograms): room for every geometry a process meets, so the
    tiny-model files' many small programs do not push out the SmolLM2 step between the files
    that use it (loading it again from the compile cache takes ~11 s on this CPU backend)."""
    from cara_jax.engine.program_store import PROCESS_PROGRAMS

    PROCESS_PROGRAMS.capacity = 256


_share_programs()


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    from cara_jax.embedded import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm(smollm_path):
    from cara_jax.weights import load_model

    return load_model(smollm_path)


@pytest.fixture(scope="session")
def hf_smollm(smollm_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm_path.parent), gguf_file=smollm_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def smol_tok(smollm_path):
    """The engine's tokenizer for SmolLM2 (the tiny test model shares its vocabulary)."""
    from cara_jax.tokenizer import Tokenizer

    return Tokenizer.from_path(smollm_path)


@pytest.fixture(scope="session")
def hf_smollm_tokenizer(smollm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random HF Llama: GQA, untied embeddings, llama3 rope scaling, sharded safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_theta=50000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # default init is tiny; widen it so logits are far from uniform
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out, max_shard_size="200KB", safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def hf_tiny(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny(tiny_llama_dir):
    from cara_jax.weights import load_model

    return load_model(tiny_llama_dir, use_cache=False)


# The files that take longest (their engines' compiles dominate), first. `make test` splits the
# suite over processes file by file (each process starts with the 1st and 3rd, or the 2nd and
# 4th, then takes the next file when one ends); a long file handed out last would be the run's
# tail, so these go first and the many short files fill in around them. The SmolLM2 files share
# one engine geometry (tests/server_helpers.py SMOL_FLAGS): the parity test compiles its 64-token
# step while the other process runs tiny-model files, the CPU-assist tests then compile only the
# CPU-assisted twin, and the server files after them find both in the compile cache.
LONGEST_FIRST = (
    "tests/model/test_model_parity.py",
    "tests/engine/test_engine.py",
    "tests/engine/test_cpu_assist.py",
    "tests/engine/test_paged_engine.py",
    "tests/server/test_server_ops.py",
    "tests/server/test_server_cold_start.py",
    "tests/server/test_server.py",
    "tests/engine/test_prefix_cache.py",
    "tests/server/test_structured_outputs.py",
    "tests/engine/test_cold_start_auto.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    root = Path(str(config.rootpath))
    items.sort(key=lambda it: rank.get(Path(str(it.path)).relative_to(root).as_posix(),
                                       len(rank)))  # fmt: skip
