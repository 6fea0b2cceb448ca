"""Train 8 LoRA adapters in one jitted step, score them, save them as PEFT folders, serve them.

Each adapter learns one fact ("the codename of team k is W_k") on the embedded SmolLM2. All 8
train together: every step runs the dense forward once over 8 rows, row k on adapter k, and
Adam updates all of them (cara_jax.adapters.LoraSet, cara_jax.dense). Then an engine takes the
trained weights from memory (no disk round trip), scores each answer under its adapter and
under the base model in one batch (LLM.score), the adapters are saved as PEFT folders (loadable
by HF PEFT and by `cara-serve --lora-dir`), and each answers its question greedily.

    python examples/train_many_adapters.py [--steps 30] [--out trained_adapters]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cara_jax import LLM, SamplingParams
from cara_jax.adapters import LoraSet, save_peft_adapter
from cara_jax.dense import sequence_nll
from cara_jax.embedded import default_model_path
from cara_jax.engine import Engine, EngineConfig
from cara_jax.tokenizer import Tokenizer
from cara_jax.weights import load_model

WORDS = ["Aurora", "Basalt", "Cinder", "Dahlia", "Ember", "Fjord", "Garnet", "Harbor"]


def question(k: int) -> str:
    return f"Q: What is the codename of team {k}?\nA:"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="trained_adapters")
    a = ap.parse_args()

    path = default_model_path()
    loaded, tok = load_model(path), Tokenizer.from_path(path)
    n = len(WORDS)
    # one row per adapter: its question and answer, right-padded; the loss is on the answer
    rows = [(tok.encode(question(k)), tok.encode(f" {w}.", add_special_tokens=False))
            for k, w in enumerate(WORDS)]  # fmt: skip
    width = max(len(q) + len(ans) for q, ans in rows)
    tokens = np.zeros((n, width), np.int32)
    mask = np.zeros((n, width - 1), np.float32)
    for i, (q, ans) in enumerate(rows):
        tokens[i, : len(q) + len(ans)] = q + ans
        mask[i, len(q) - 1 : len(q) + len(ans) - 1] = 1.0  # predict the answer's tokens
    slots = np.arange(1, n + 1)  # row k trains adapter k (slot 0 would be the base model)

    lora_set, params = LoraSet.init(loaded.cfg, n, 8, ("q_proj", "v_proj", "o_proj", "down_proj"),
                                    jax.random.key(0))  # fmt: skip
    opt = optax.adam(2e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        def loss(p):
            return jnp.sum(sequence_nll(loaded, tokens, mask, lora_set.hook(p, slots)))

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    t0 = time.perf_counter()
    for i in range(a.steps):
        params, state, value = step(params, state)
        if i % 5 == 0 or i == a.steps - 1:
            print(f"step {i:3d}: summed answer NLL over {n} adapters {float(value):8.3f} "
                  f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip

    engine = Engine(loaded, tok, EngineConfig(max_num_seqs=2 * n, max_model_len=128,
                                              token_buckets=(64,)))  # fmt: skip
    llm = LLM.from_engine(engine)
    for k in range(n):  # from memory: no folder is written for serving
        llm.load_adapter(f"team-{k}", weights=lora_set.adapter(params, k))
    prompts = [tok.encode(question(k)) for k in range(n)]
    answers = [f" {w}." for w in WORDS]
    names = [f"team-{k}" for k in range(n)]
    scores = llm.score(prompts * 2, answers * 2, adapter=names + [None] * n)  # one batch
    for k in range(n):
        mine, base = scores[k].total, scores[n + k].total
        print(f"team {k}: log p(answer) with its adapter {mine:7.2f}, base model {base:7.2f}")

    out = Path(a.out)
    for k in range(n):
        save_peft_adapter(lora_set.adapter(params, k), out / f"team-{k}",
                          base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")  # fmt: skip
    print(f"saved {n} PEFT folders under {out}/")

    greedy = SamplingParams(temperature=0, max_tokens=6)
    outs = llm.generate(prompts, greedy, adapter=names)
    for k, o in enumerate(outs):
        print(f"team-{k} answers {o.text.strip()!r} (trained on {WORDS[k]!r})")
    engine.close()


if __name__ == "__main__":
    main()
