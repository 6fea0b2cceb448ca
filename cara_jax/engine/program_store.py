"""Compiled programs kept on disk, so a restart loads them instead of tracing and compiling.

JAX's persistent compilation cache already skips XLA's compile on a restart, but every program
must still be traced in Python (about 3 s each for a 30-layer model, under the GIL, so threads do
not help). This store keeps the serialized executable itself: a warm start deserializes it.

The key covers everything the executable depends on: the jax/jaxlib versions and the device, the
abstract arguments (shapes, dtypes, tree structure, static fields: model, cache and pool sizes,
rank buckets, strategy) and the source of the modules that define the step. Anything that
cannot be serialized (a program with host callbacks) is simply not stored. A damaged file is
ignored and rewritten.

Off on the CPU backend (``from_jax_config`` says why). A program to be stored is compiled with
XLA's persistent cache off (``compile``): on CPU an
executable that was itself loaded from that cache serializes to a payload that loads but fails
when run ("Function ... not found"), which a changed key with an unchanged program would hit.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import jax
from jax._src import config as jax_config

log = logging.getLogger(__name__)

_SOURCES = ("engine/step.py", "model.py", "attention.py", "ragged.py", "sampler.py",
            "adapters/multi_lora.py", "cpu_assist.py", "lora_hooks.py", "kv_cache.py")  # fmt: skip


def _code_hash() -> str:
    """Hash of the sources a stored program was traced from: the engine's own and the kernels'
    (the jnp references in pallas_kernels run inside the step too)."""
    import pallas_kernels

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in _SOURCES:
        h.update((root / rel).read_bytes())
    for path in sorted(Path(pallas_kernels.__file__).resolve().parent.glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()


class ProgramStore:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        dev = jax.devices()[0]
        self._salt = repr((jax.__version__, jax.lib.__version__ if hasattr(jax, "lib") else "",
                           dev.platform, dev.device_kind, _code_hash()))  # fmt: skip

    @classmethod
    def from_jax_config(cls) -> ProgramStore | None:
        """A store beside JAX's persistent compilation cache, when one is configured (and this
        JAX can compile around that cache, see ``compile``).

        Not on the CPU backend unless ``CARA_JAX_PROGRAM_STORE=1``: there, engine programs
        compiled by the warm-up threads and stored by one server process failed when another
        process loaded and ran them ("Function multiply_concatenate_fusion not found", a server
        that could not start), although a single-threaded toy program round-trips. Without the
        store a warm CPU start re-traces its programs (seconds each) and XLA's persistent cache
        still skips the compiles."""
        folder = jax.config.jax_compilation_cache_dir
        if not folder or not hasattr(jax_config, "enable_compilation_cache"):
            return None
        if jax.default_backend() == "cpu" and os.environ.get("CARA_JAX_PROGRAM_STORE") != "1":
            return None
        return cls(Path(folder) / "programs")

    def key(self, name: str, abstract_args) -> str:
        leaves, tree = jax.tree_util.tree_flatten(abstract_args)
        sig = repr((name, str(tree), [(tuple(a.shape), str(a.dtype)) for a in leaves]))
        return hashlib.sha256((self._salt + sig).encode()).hexdigest()[:40]

    @staticmethod
    def compile(lowered: jax.stages.Lowered) -> jax.stages.Compiled:
        """Compile a program that will be saved: never from XLA's persistent cache (see the
        module docstring); the switch is thread-local, so parallel warm-up compiles are fine."""
        with jax_config.enable_compilation_cache(False):
            return lowered.compile()

    def load(self, key: str):
        path = self.folder / f"{key}.bin"
        if not path.is_file():
            return None
        try:
            from jax.experimental.serialize_executable import deserialize_and_load

            payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            return deserialize_and_load(payload, in_tree, out_tree)
        except Exception as e:  # a truncated or stale file: compile instead, then rewrite
            log.warning("ignoring stored program %s: %s", path.name, e)
            return None

    def save(self, key: str, compiled) -> None:
        try:
            from jax.experimental.serialize_executable import serialize

            blob = pickle.dumps(serialize(compiled))
        except Exception as e:  # e.g. host callbacks (CPU assist): not serializable
            log.debug("program not stored: %s", e)
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, self.folder / f"{key}.bin")
        except OSError as e:  # a full or read-only disk only costs the next start a compile
            log.warning("could not store a compiled program: %s", e)


class ProcessPrograms:
    """Compiled step programs shared by every engine of one process (bounded, LRU).

    A second engine of the same model and geometry (a bench's next system, a test's second
    engine) would otherwise trace and lower each program again: seconds each, under the GIL,
    even when XLA's persistent cache skips the compile. The key is everything the executable
    depends on within a process: the model's graph (its config included), the parameter tree
    and shardings, the program and its abstract arguments (shapes, dtypes, static fields). The
    step closes over nothing else; programs with host callbacks (CPU assist) are not shared.
    """

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._programs: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(graphdef, params: list, name: str, abstract_args) -> tuple:
        leaves, tree = jax.tree_util.tree_flatten(abstract_args)
        shardings = tuple(getattr(a, "sharding", None) for a in params)
        return (graphdef, shardings, name, str(tree),
                tuple((tuple(a.shape), str(a.dtype)) for a in leaves))  # fmt: skip

    def get(self, key: tuple):
        with self._lock:
            exe = self._programs.get(key)
            if exe is not None:
                self._programs.move_to_end(key)
            return exe

    def put(self, key: tuple, exe) -> None:
        with self._lock:
            self._programs[key] = exe
            self._programs.move_to_end(key)
            while len(self._programs) > self.capacity:
                self._programs.popitem(last=False)


PROCESS_PROGRAMS = ProcessPrograms()
