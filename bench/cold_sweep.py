"""Cold-start sweep: emulated link x prompt length x rank, TTFT of sync, cpu_assist, auto, cached.

Where does CPU-assisted prefill beat waiting for the copy, on this machine, and does ``auto``
pick the faster one? One engine per mode (all started first, warmed up); per cell (link, prompt
length, rank) the modes take turns, request by request, so that they see the same machine; each
serves ``--reps`` requests one at a time, each on an adapter evicted from the device first
(cached mode keeps every adapter resident: the floor). TTFT is from
``add_request`` to the first token. For auto, the cost model is reset to the cell's link as its
prior whenever the link changes (as a server started on that link would be), then learns from
the cell's loads.

    python -m bench.cold_sweep [--links 0.5,1,2,5,10 --prompts 32,128,512 --ranks 8,64]

Writes ``bench/results/cold_sweep.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.lib.report import save_report
from bench.systems.common import TARGET_SETS, RunOptions, model_config, write_adapters

MODES = ("sync", "cpu_assist", "auto", "cached")


def _serve_one(eng, prompt: list[int], name: str, evict: bool) -> tuple[float, str | None]:
    from cara_jax.sampling_params import SamplingParams

    if evict:
        h = eng.registry.entry(name).content_hash
        while eng.pool.is_resident(h):
            try:
                eng.pool.evict(h)
            except Exception:  # still held by the previous request's release: next step
                eng.step()
    sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    t0 = time.perf_counter()
    rid = eng.add_request(prompt, sp, name)
    first = None
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == rid and o.token_ids and first is None:
                first = time.perf_counter() - t0
    rec = eng.finished_requests[-1]
    assert rec.request_id == rid
    return first, rec.cold_start_mode


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--links", default="0.5,1,2,5,10", help="GB/s, comma list")
    ap.add_argument("--prompts", default="32,128,512")
    ap.add_argument("--ranks", default="8,64")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--targets", default="qkvo", choices=sorted(TARGET_SETS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", default="bench/results/cold_sweep")
    args = ap.parse_args(argv)
    links = [float(x) for x in args.links.split(",")]
    prompts = [int(x) for x in args.prompts.split(",")]
    ranks = [int(x) for x in args.ranks.split(",")]
    modes = args.modes.split(",")

    from bench.systems.cara import CaraSystem
    from cara_jax.engine.cold_start import ColdStartModel

    cfg = model_config()
    rng = np.random.default_rng(0)
    cells = list(itertools.product(links, prompts, ranks))
    ttft: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    picks: dict[str, list[str]] = {}
    info: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cara-cold-sweep-") as d:
        names = {f"r{r}-{i}": r for r in ranks for i in range(args.reps)}
        adapters = write_adapters(Path(d), names, cfg, TARGET_SETS[args.targets], seed=5)
        engines = {}
        for mode in modes:  # every mode's engine up first: each cell then runs them in turn
            opts = RunOptions(cold_start=mode, max_num_seqs=4, max_prefill_seqs=2,
                              warmup_requests=4, link_gbps=links[0])  # fmt: skip
            sysm = CaraSystem(opts, label=f"cara-jax[{mode}]")
            t = time.perf_counter()
            sysm.start(adapters, max_context=max(prompts) + 4)
            engines[mode] = sysm
            info[mode] = {"start_s": time.perf_counter() - t, **sysm.info}
        last_link = None
        for link, plen, rank in cells:
            key = f"{link:g}/{plen}/{rank}"
            for mode in modes:
                eng = engines[mode].engine
                eng.pool.link_gbps = link
                if mode == "auto" and link != last_link:
                    eng.residency.cold_model = ColdStartModel(
                        cfg, link_bytes_per_s=link * 1e9,
                        cpu_flops=eng.residency.cold_model.cpu_flops.value,
                    )  # fmt: skip
            last_link = link
            # the modes take turns request by request, so that they see the same machine
            for i in range(args.reps):
                prompt = rng.integers(100, 20000, size=plen).tolist()
                for mode in modes:
                    eng = engines[mode].engine
                    first, used = _serve_one(eng, prompt, f"r{rank}-{i}", mode != "cached")
                    ttft[mode].setdefault(key, []).append(first)
                    if mode == "auto":
                        picks.setdefault(key, []).append(used or "resident")
            print(f"link {link:>4g} GB/s prompt {plen:>4} rank {rank:>3}: TTFT p50 ms "
                  + ", ".join(f"{m} {1e3 * statistics.median(ttft[m][key]):.0f}" for m in modes),
                  flush=True)  # fmt: skip
        if "auto" in engines:
            info["auto"]["model"] = engines["auto"].engine.residency.cold_model.snapshot()
        for sysm in engines.values():
            sysm.close()
    rep = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(terse=True)},
        "args": vars(args), "ttft_s": ttft, "auto_picks": picks, "info": info,
    }  # fmt: skip
    rep["summary"] = summarize(rep, cells)
    out = Path(args.out)
    save_report(out, render(rep, cells), rep)
    plot(rep, cells, out.with_suffix(".png"))


def summarize(rep: dict, cells) -> dict:
    t, picks = rep["ttft_s"], rep["auto_picks"]
    out = {"cpu_assist_wins": [], "auto_right": 0, "auto_requests": 0}
    if not all(m in t for m in ("sync", "cpu_assist")):
        return out
    for link, plen, rank in cells:
        key = f"{link:g}/{plen}/{rank}"
        s, c = statistics.median(t["sync"][key]), statistics.median(t["cpu_assist"][key])
        faster = "cpu_assist" if c < s else "sync"
        if faster == "cpu_assist":
            out["cpu_assist_wins"].append(key)
        for used in picks.get(key, []):
            out["auto_requests"] += 1
            # a request auto served 'resident' had its load done before it was needed: sync
            out["auto_right"] += (used if used != "resident" else "sync") == faster
    return out


def render(rep: dict, cells) -> str:
    t = rep["ttft_s"]
    modes = [m for m in MODES if m in t]
    a = rep["args"]
    lines = [
        "# Cold-start sweep: TTFT p50 (ms) by emulated link, prompt length and rank",
        "",
        f"Machine: {rep['machine']['cpus']} CPUs, no accelerator; SmolLM2-135M float32; adapters "
        f"on {a['targets']}; {a['reps']} requests per cell and mode, one at a time, the modes "
        "taking turns request by request, each on an adapter evicted from the device first "
        "(cached: all resident). The link is emulated (PoolConfig.emulate_link_gbps): on a "
        "CPU the 'device' is host memory.",
        "",
        "| link GB/s | prompt | rank | " + " | ".join(modes) + " | faster of sync/cpu | auto picked |",
        "|---:|---:|---:|" + "---:|" * len(modes) + "---|---|",
    ]
    for link, plen, rank in cells:
        key = f"{link:g}/{plen}/{rank}"
        vals = {m: statistics.median(t[m][key]) for m in modes}
        faster = ""
        if "sync" in vals and "cpu_assist" in vals:
            faster = "cpu_assist" if vals["cpu_assist"] < vals["sync"] else "sync"
        picked = ", ".join(rep["auto_picks"].get(key, []))
        lines.append(f"| {link:g} | {plen} | {rank} | "
                     + " | ".join(f"{1e3 * vals[m]:.0f}" for m in modes)
                     + f" | {faster} | {picked} |")  # fmt: skip
    s = rep["summary"]
    if s["auto_requests"]:
        lines += [
            "",
            f"- cpu_assist beats sync in {len(s['cpu_assist_wins'])} of {len(cells)} cells: "
            + (", ".join(s["cpu_assist_wins"]) or "none") + " (link/prompt/rank).",
            f"- auto picked the faster mode for {s['auto_right']} of {s['auto_requests']} "
            f"requests ({s['auto_right'] / s['auto_requests']:.0%}); 'resident' counts as sync "
            "(the prefetched load was done before the request needed a choice).",
        ]
    if "auto" in rep["info"] and "model" in rep["info"]["auto"]:
        m = rep["info"]["auto"]["model"]
        lines.append(f"- auto's fitted model at the end: {m['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s "
                     f"+ {1e3 * m['load_overhead_s']:.1f} ms per load, CPU "
                     f"{m['cpu_flops_per_s'] / 1e9:.1f} GFLOP/s + "
                     f"{1e3 * m['exchange_s']:.2f} ms per exchange.")  # fmt: skip
    return "\n".join(lines)


def plot(rep: dict, cells, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    t = rep["ttft_s"]
    modes = [m for m in MODES if m in t]
    links = sorted({c[0] for c in cells})
    prompts = sorted({c[1] for c in cells})
    ranks = sorted({c[2] for c in cells})
    fig, axes = plt.subplots(len(ranks), len(prompts), figsize=(4 * len(prompts), 3.2 * len(ranks)),
                             squeeze=False, sharex=True)  # fmt: skip
    for i, rank in enumerate(ranks):
        for j, plen in enumerate(prompts):
            ax = axes[i][j]
            for m in modes:
                ys = [1e3 * statistics.median(t[m][f"{link:g}/{plen}/{rank}"]) for link in links]
                ax.plot(links, ys, marker="o", label=m)
            ax.set_xscale("log")
            ax.set_title(f"prompt {plen}, rank {rank}", fontsize=9)
            ax.set_xlabel("link GB/s")
            ax.set_ylabel("TTFT p50 ms")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
