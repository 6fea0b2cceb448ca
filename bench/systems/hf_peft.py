"""HF transformers + PEFT in PyTorch, served as its users do it.

One PeftModel holds every adapter (``load_adapter`` per name, all in memory: no cold start).
The serving loop is static batching: take every request that has arrived (up to ``max_batch``),
run one mixed-adapter batch to completion (PEFT's ``adapter_names``, left padding, KV cache,
greedy, token by token so each token's time is recorded), then take the next batch. Requests that
arrive meanwhile wait. A batch runs until its longest request is done; each request keeps only
its own ``max_tokens`` tokens (EOS is ignored, as in every system here).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from bench.lib.metrics import RequestResult
from bench.lib.workload import Request, Trace
from bench.systems.common import ReplayClock, RunOptions, progress_bar, run_system

NAME = "HF+PEFT"


class HfPeftSystem:
    def __init__(self, opts: RunOptions | None = None, label: str | None = None) -> None:
        self.opts = opts or RunOptions()
        self.name = label or NAME
        self.model = None
        self.info: dict[str, Any] = {}

    def start(self, adapters: dict[str, Path], max_context: int) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from cara_jax.embedded import default_model_path

        torch.set_num_threads(os.cpu_count() or 1)
        path = default_model_path()
        t = time.perf_counter()
        base = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        names = list(adapters)
        if not names:
            self.model = base.eval()
        else:
            model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
            for n in names[1:]:
                model.load_adapter(str(adapters[n]), adapter_name=n)
            self.model = model.eval()
        self.info["load_s"] = time.perf_counter() - t
        warm = [
            Request(
                f"w{i}",
                0.0,
                names[i % len(names)] if names else None,
                0,
                [100 + j for j in range(16)],
                4,
            )
            for i in range(2)
        ]
        self._serve(warm, time.perf_counter(), [[], []])

    def _serve(
        self,
        batch: list[Request],
        t0: float,
        times: list[list[float]],
        tokens: list[list[int]] | None = None,
    ) -> None:
        """Generate for a batch; per request, token times (and the token ids into ``tokens``)."""
        import torch
        from transformers import DynamicCache

        width = max(len(r.prompt) for r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(batch):  # left padding
            ids[j, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[j, width - len(r.prompt) :] = 1
        kw: dict[str, Any] = {}
        if hasattr(self.model, "peft_config"):
            kw["adapter_names"] = [r.adapter or "__base__" for r in batch]
        steps = max(r.max_tokens for r in batch)
        cache = DynamicCache()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                **kw,
            )
            for step in range(steps):
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                now = time.perf_counter() - t0
                for j, (r, t) in enumerate(zip(batch, times, strict=True)):
                    if len(t) < r.max_tokens:
                        t.append(now)
                        if tokens is not None:
                            tokens[j].append(int(tok[j, 0]))
                if step == steps - 1:
                    break
                mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
                pos = pos[:, -1:] + 1
                out = self.model(
                    input_ids=tok,
                    attention_mask=mask,
                    position_ids=pos,
                    past_key_values=cache,
                    use_cache=True,
                    **kw,
                )

    def replay(self, trace: Trace, desc: str = "") -> list[RequestResult]:
        reqs = trace.requests
        results: dict[str, RequestResult] = {}
        bar = progress_bar(len(reqs), desc or self.name, self.opts.progress)
        clock = ReplayClock(trace)
        queue: list[int] = []
        while clock.pending() or queue:
            queue += clock.due()
            if not queue:
                clock.sleep_until_next(cap=1.0)
                continue
            batch = [reqs[i] for i in queue[: self.opts.max_batch]]
            queue = queue[self.opts.max_batch :]
            times: list[list[float]] = [[] for _ in batch]
            err = None
            try:
                self._serve(batch, clock.t0, times)
            except Exception as e:  # e.g. out of memory: the batch fails, the server goes on
                err = f"{type(e).__name__}: {e}"
            for r, t in zip(batch, times, strict=True):
                results[r.id] = RequestResult(
                    r.id,
                    r.arrival,
                    t if err is None else [],
                    err is None,
                    err,
                    r.adapter,
                    r.rank,
                    False,
                    len(r.prompt),
                )
            bar.update(len(batch))
        bar.close()
        return [results[r.id] for r in reqs]

    def close(self) -> None:
        self.model = None
        import gc

        gc.collect()


def run(
    trace: Trace, adapters: dict[str, Path], opts: RunOptions | None = None
) -> list[RequestResult]:
    return run_system(HfPeftSystem(opts), trace, adapters, opts)
