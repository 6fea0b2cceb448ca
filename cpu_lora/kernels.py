"""CPU LoRA delta kernels: out[T, out] = (x[T, in] @ A[in, r]) @ B[r, out] in float32.

Two single-threaded implementations (each worker process is one core, with one BLAS thread):

- ``lora_numpy``: two GEMMs through numpy's BLAS (``np.dot`` with ``out=``, no temporaries
  beyond the [T, r] shrink result);
- ``lora_numba``: a Numba loop nest (``njit``, ``fastmath``, not ``parallel``), blocked over
  tokens so each row of A and B is read once per block of tokens.

``default_kernel(T, in, r, out)`` picks the kernel per shape from the one-thread measurements
in docs/cpu_lora.md (``python -m bench.cpu_lora_kernels kernels``): BLAS, 1.2-6.9x faster than the Numba
loop nest at every measured shape. The workers call it; ``lora_delta`` is the convenience form.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Kernel = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]

# Tokens per block of the Numba kernel: the block's [TB, r] shrink results stay in registers/L1
# while one row of B streams past them.
_TB = 8


def as_f32(x: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 view or copy (bf16 from ml_dtypes, fp16, fp64 are converted)."""
    return np.ascontiguousarray(x, dtype=np.float32)


def lora_numpy(x: np.ndarray, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out[:] = (x @ a) @ b with two BLAS calls; all float32, C-contiguous."""
    np.dot(np.dot(x, a), b, out=out)


def _loops(x, a, b, out):  # pragma: no cover - compiled by Numba
    t_n, d_in = x.shape
    r = a.shape[1]
    d_out = b.shape[1]
    v = np.empty((_TB, r), np.float32)
    for t0 in range(0, t_n, _TB):
        tb = min(_TB, t_n - t0)
        # shrink: v[k, :] = x[t0 + k, :] @ a; each row of a is read once per token block and
        # the inner loop runs along it (contiguous)
        v[:] = 0.0
        for i in range(d_in):
            for k in range(tb):
                xi = x[t0 + k, i]
                for j in range(r):
                    v[k, j] += xi * a[i, j]
        # expand: out[t0 + k, :] = v[k, :] @ b; each row of b is read once per token block
        for k in range(tb):
            for o in range(d_out):
                out[t0 + k, o] = 0.0
        for j in range(r):
            for k in range(tb):
                vkj = v[k, j]
                for o in range(d_out):
                    out[t0 + k, o] += vkj * b[j, o]


_compiled: Kernel | None = None


def lora_numba(x: np.ndarray, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out[:] = (x @ a) @ b with the Numba loop nest (compiled on first use, cached on disk)."""
    global _compiled
    if _compiled is None:
        import numba  # a dependency, but imported only by processes that use this kernel

        _compiled = numba.njit(fastmath=True, cache=True, nogil=True, parallel=False)(_loops)
    _compiled(x, a, b, out)


KERNELS: dict[str, Kernel] = {"numpy": lora_numpy, "numba": lora_numba}


def default_kernel(tokens: int, d_in: int, rank: int, d_out: int) -> Kernel:
    """The faster kernel for this shape, from the one-thread measurements in docs/cpu_lora.md.

    BLAS won at every measured shape (SmolLM2 and Llama-7B projections, ranks 8-64,
    1-512 tokens), so the shape arguments are unused for now; they stay so that a measured
    shape-dependent winner needs no change at the call sites.
    """
    del tokens, d_in, rank, d_out
    return lora_numpy


def lora_delta(
    x: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    out: np.ndarray | None = None,
    kernel: str = "auto",
) -> np.ndarray:
    """(x @ a) @ b in float32 for one projection and a slice of tokens.

    ``x`` [T, in], ``a`` [in, r], ``b`` [r, out] in any float dtype (converted to float32);
    ``out`` [T, out] float32 C-contiguous if given (written in place). ``kernel``: "auto"
    (``default_kernel``), "numpy" or "numba".
    """
    x, a, b = as_f32(x), as_f32(a), as_f32(b)
    t_n = x.shape[0]
    if out is None:
        out = np.empty((t_n, b.shape[1]), np.float32)
    if t_n == 0:
        return out
    fn = default_kernel(t_n, *a.shape, b.shape[1]) if kernel == "auto" else KERNELS[kernel]
    fn(x, a, b, out)
    return out
