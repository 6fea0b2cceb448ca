"""Stored programs survive a process restart, also when XLA's persistent cache already held the
program (a changed store key over an unchanged program: an upgrade that only edits comments)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_compilation_cache_dir", sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from cara_jax.engine.program_store import ProgramStore

    def f(x, y):
        z = jnp.concatenate([x * 2, y * 3], axis=0)
        for _ in range(3):
            z = jnp.tanh(z @ z.T) @ z
        return z

    x = y = jnp.full((32, 32), 0.01, jnp.float32)
    mode = sys.argv[2]
    lowered = jax.jit(f).lower(x, y)
    if mode == "xla":  # XLA's own cache only: fills it
        lowered.compile()
    else:
        store = ProgramStore.from_jax_config()
        key = store.key("f", (x, y))
        exe = store.load(key)
        if mode == "save":
            assert exe is None
            exe = store.compile(lowered)
            store.save(key, exe)
        else:
            assert exe is not None, "the stored program was not found"
        got = float(exe(x, y).sum())
        want = float(jax.jit(f)(x, y).sum())  # after: jit's in-memory cache would serve compile
        assert abs(got - want) <= 1e-6 * abs(want), (got, want)
    print("ok", mode)
    """
)


def _run(cache, mode: str) -> None:
    env = {**os.environ, "CARA_JAX_PROGRAM_STORE": "1"}  # the store is off on CPU by default
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(cache), mode],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"ok {mode}" in out.stdout


def test_stored_program_runs_after_restart_over_a_warm_xla_cache(tmp_path):
    # process 1 fills XLA's cache; process 2 misses the store, compiles and saves; process 3
    # loads the stored program and runs it (a program re-serialized from XLA's cache fails here)
    for mode in ("xla", "save", "load"):
        _run(tmp_path, mode)


def test_the_store_is_off_on_cpu_by_default(tmp_path, monkeypatch):
    import jax

    from cara_jax.engine.program_store import ProgramStore

    monkeypatch.delenv("CARA_JAX_PROGRAM_STORE", raising=False)
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    try:
        assert jax.default_backend() != "cpu" or ProgramStore.from_jax_config() is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
