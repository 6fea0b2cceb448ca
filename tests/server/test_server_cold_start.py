"""``cara-serve --cold-start cpu_assist`` over real HTTP: adapters in --lora-dir are loaded by
name on their first request, each first prompt is prefilled with the CPU workers' deltas while
the copy runs over an emulated slow link, and the outputs are PEFT's greedy ones."""

from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from server.cli import build_parser, build_state, start_warmup
from server.instance.app import BackgroundServer, build_app
from tests.helpers import ALL7, make_peft_adapters
from tests.server_helpers import SMOL_FLAGS, Srv, get, wait_ready

SPECS = {
    "c8": dict(r=8, lora_alpha=16, target_modules=ALL7),
    "c16_qv": dict(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "c8_mlp": dict(r=8, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
}
PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def cold_srv(tmp_path_factory, hf_smollm):
    lora_dir = tmp_path_factory.mktemp("cold_lora_dir")
    paths = make_peft_adapters(lambda: copy.deepcopy(hf_smollm), lora_dir, SPECS, seed=11,
                               scale=0.5)  # fmt: skip
    args = build_parser().parse_args([
        *SMOL_FLAGS,  # the programs of tests/engine/test_cpu_assist.py's engines
        "--cold-start", "cpu_assist", "--cpu-workers", "1",
        "--emulate-link-gbps", "0.005",  # ~0.3-0.8 s per copy: the prefill cannot wait for it
        "--lora-dir", str(lora_dir),
        "--compile-cache", str(Path(os.environ["CARA_JAX_CACHE"]) / "xla"),
    ])  # fmt: skip
    state = build_state(args)
    start_warmup(state)
    server = BackgroundServer(build_app(state))
    wait_ready(server.url)
    yield Srv(server.url, state, lora_dir, state.base_name), paths
    server.stop()


def _peft_greedy(hf_smollm, path, tok, n):
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(hf_smollm), path).eval()
    ids = tok.encode(PROMPT, add_special_tokens=True)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, len(ids) :].tolist())


def _metric(url: str, name: str) -> float:
    _, text = get(url + "/metrics")
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))  # fmt: skip


def test_cpu_assist_serves_cold_adapters_with_peft_outputs(cold_srv, hf_smollm, smol_tok):
    srv, paths = cold_srv
    client = srv.client()
    before = _metric(srv.url, "cara_cpu_assist_prefills_total")
    with ThreadPoolExecutor(3) as ex:
        jobs = {name: ex.submit(client.completions.create, model=name, prompt=PROMPT,
                                max_tokens=8, temperature=0) for name in SPECS}  # fmt: skip
    got = {name: job.result().choices[0].text for name, job in jobs.items()}
    assert _metric(srv.url, "cara_cpu_assist_prefills_total") - before >= len(SPECS)
    assert _metric(srv.url, "cara_cpu_lora_layers_cpu_total") > 0
    for name, path in paths.items():
        assert got[name] == _peft_greedy(hf_smollm, path, smol_tok, 8), name
