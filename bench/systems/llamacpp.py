"""llama.cpp through llama-cpp-python, with a LoRA adapter per request.

How it is served: one ``Llama`` instance (the embedded SmolLM2 GGUF, its Q4_1 weights, all
cores), every adapter converted to a GGUF LoRA file and loaded once with
``llama_adapter_lora_init``. llama.cpp attaches adapters to a context, not to a sequence, so
requests with different adapters cannot share a batch (its server says the same: "requests with
different LoRA configurations will not be batched together"). Requests are therefore served one
at a time, first come first served: set the request's adapter on the context
(``llama_set_adapters_lora``), reset the KV state, and run ``Llama.generate`` greedily for
``max_tokens`` tokens, timing each token as the generator yields it.

The converter writes what llama.cpp's own convert_lora_to_gguf.py writes for a llama model:
general.type=adapter, adapter.type=lora, adapter.lora.alpha, and per targeted projection
``blk.N.<attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down>.weight.lora_a`` / ``.lora_b``
holding PEFT's A [r, in] and B [out, r] unchanged (not transposed; GGUF lists dims reversed, so
llama.cpp sees a as [in, r] and b as [r, out]). B of q and k gets the row permutation llama.cpp
applies to those weights (its rotary layout), A does not. llama.cpp scales by alpha / r.
"""

from __future__ import annotations

import ctypes
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.lib.metrics import RequestResult
from bench.lib.workload import Trace
from bench.systems.common import (
    ReplayClock,
    RunOptions,
    SystemUnavailable,
    model_config,
    progress_bar,
    run_system,
)

NAME = "llama.cpp"
GGUF_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
INSTALL_HINT = (
    "llama-cpp-python is not installed; `pip install -e '.[llamacpp]'` builds it "
    "(compiles llama.cpp, several minutes on 2 cores)"
)


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF q/k row order -> llama.cpp's (interleaved rotary pairs); rows are the first axis."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def peft_to_gguf(
    peft_dir: Path, out: Path, n_heads: int, n_kv_heads: int, arch: str = "llama"
) -> Path:
    """Convert a PEFT LoRA folder (Llama projections) to a llama.cpp GGUF LoRA adapter."""
    import gguf
    from safetensors.numpy import load_file

    peft_dir = Path(peft_dir)
    conf = json.loads((peft_dir / "adapter_config.json").read_text())
    if conf.get("rank_pattern") or conf.get("alpha_pattern"):
        raise ValueError("per-module rank/alpha patterns are not supported by this converter")
    rank, alpha = int(conf["r"]), float(conf["lora_alpha"])
    if conf.get("use_rslora"):
        alpha *= rank**0.5  # llama.cpp scales by alpha / r; rsLoRA means alpha / sqrt(r)
    tensors = load_file(str(peft_dir / "adapter_model.safetensors"))
    w = gguf.GGUFWriter(str(out), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            continue
        parts = key.split(".")  # base_model.model.model.layers.{i}.{mod}.{proj}.lora_A.weight
        layer, proj = int(parts[parts.index("layers") + 1]), parts[-3]
        a = np.ascontiguousarray(tensors[key], np.float32)
        b = np.asarray(tensors[key.replace(".lora_A.", ".lora_B.")], np.float32)
        if proj == "q_proj":
            b = permute_rotary(b, n_heads)
        elif proj == "k_proj":
            b = permute_rotary(b, n_kv_heads)
        name = f"blk.{layer}.{GGUF_NAMES[proj]}.weight"
        w.add_tensor(name + ".lora_a", a)
        w.add_tensor(name + ".lora_b", np.ascontiguousarray(b))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out)


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise SystemUnavailable(INSTALL_HINT) from e
    return llama_cpp


class LlamaCppSystem:
    def __init__(self, opts: RunOptions | None = None, label: str | None = None) -> None:
        self.opts = opts or RunOptions()
        self.name = label or NAME
        self.llm = None
        self.info: dict[str, Any] = {"served": "one request at a time (FCFS), per-request LoRA"}
        self._adapters: dict[str, Any] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._current: str | None = "unset"

    def start(self, adapters: dict[str, Path], max_context: int) -> None:
        llama_cpp = _import_llama_cpp()
        from cara_jax.embedded import default_model_path

        path = default_model_path()
        threads = self.opts.llama_threads or os.cpu_count() or 1
        t = time.perf_counter()
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=max(256, max_context + 8),
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        cfg = model_config()
        self._tmp = tempfile.TemporaryDirectory(prefix="cara-bench-gguf-")
        for name, d in adapters.items():
            out = peft_to_gguf(
                Path(d), Path(self._tmp.name) / f"{name}.gguf", cfg.num_heads, cfg.num_kv_heads
            )
            ad = llama_cpp.llama_adapter_lora_init(self.llm.model, str(out).encode())
            if not ad:
                raise SystemUnavailable(f"llama.cpp refused the converted adapter {name}")
            self._adapters[name] = ad
        self.info["load_s"] = time.perf_counter() - t
        self.info["threads"] = threads
        first = next(iter(adapters), None)
        self._generate([100 + j for j in range(16)], first, 4, lambda: None)  # warm-up

    def _set_adapter(self, name: str | None) -> None:
        if name == self._current:
            return
        llama_cpp = _import_llama_cpp()
        ctx = self.llm.ctx
        if name is None:
            rc = llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapters[name])
            rc = llama_cpp.llama_set_adapters_lora(ctx, arr, 1, (ctypes.c_float * 1)(1.0))
        if rc != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed for {name!r} (rc {rc})")
        self._current = name

    def _generate(self, prompt: list[int], adapter: str | None, n: int, tick) -> None:
        self._set_adapter(adapter)
        self.llm.reset()  # n_tokens = 0: no KV prefix reuse across requests (adapters differ)
        count = 0
        for _ in self.llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
            tick()
            count += 1
            if count >= n:
                break

    def last_logits(self, prompt: list[int], adapter: str | None) -> np.ndarray:
        """Logits after ``prompt`` with ``adapter`` (for checking the conversion)."""
        self._set_adapter(adapter)
        self.llm.reset()
        self.llm.eval(prompt)
        ptr = _import_llama_cpp().llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).astype(np.float64)

    def replay(self, trace: Trace, desc: str = "") -> list[RequestResult]:
        reqs = trace.requests
        bar = progress_bar(len(reqs), desc or self.name, self.opts.progress)
        clock = ReplayClock(trace)
        queue: list[int] = []
        out: dict[str, RequestResult] = {}
        while clock.pending() or queue:
            queue += clock.due()
            if not queue:
                clock.sleep_until_next(cap=1.0)
                continue
            r = reqs[queue.pop(0)]
            times: list[float] = []
            err = None
            try:
                self._generate(
                    r.prompt, r.adapter, r.max_tokens, lambda t=times: t.append(clock.now())
                )
            except Exception as e:  # a failed request fails alone
                err = f"{type(e).__name__}: {e}"
            out[r.id] = RequestResult(
                r.id,
                r.arrival,
                times if err is None else [],
                err is None,
                err,
                r.adapter,
                r.rank,
                None,
                len(r.prompt),
            )
            bar.update()
            queue += clock.due()
        bar.close()
        return [out[r.id] for r in reqs]

    def close(self) -> None:
        if self.llm is not None:
            llama_cpp = _import_llama_cpp()
            self._set_adapter(None)
            for ad in self._adapters.values():
                llama_cpp.llama_adapter_lora_free(ad)
            self._adapters.clear()
            self.llm.close()
            self.llm = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def run(
    trace: Trace, adapters: dict[str, Path], opts: RunOptions | None = None
) -> list[RequestResult]:
    return run_system(LlamaCppSystem(opts), trace, adapters, opts)
