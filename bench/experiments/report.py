"""Reports of ``python -m bench run``: the Markdown tables, the JSON files and the plots.

Every file is scrubbed of the machine's paths (home, repository, temporary folders) before it
is written, so results can be committed as they are.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from bench.lib import metrics, plots
from bench.lib.plan import Plan
from bench.lib.report import save_report
from bench.lib.workload import WorkloadSpec, describe
from bench.systems.common import TARGET_SETS

_COLS = [
    ("tok/s", "throughput_tok_s", 1, 1),
    ("decode tok/s", "decode_tok_s", 1, 1),
    ("req/s", "throughput_req_s", 1, 2),
    ("TTFT p50 s", "ttft_p50", 1, 2),
    ("TTFT p90 s", "ttft_p90", 1, 2),
    ("TTFT p99 s", "ttft_p99", 1, 2),
    ("TPOT p50 ms", "tpot_p50", 1e3, 0),
    ("TPOT p90 ms", "tpot_p90", 1e3, 0),
    ("TPOT p99 ms", "tpot_p99", 1e3, 0),
    ("E2E p50 s", "e2e_p50", 1, 2),
    ("E2E p99 s", "e2e_p99", 1, 2),
    ("SLO TTFT", "slo_ttft", 100, 0),
    ("SLO TPOT", "slo_tpot", 100, 0),
    ("SLO both", "slo_both", 100, 0),
    ("errors", "errors", 1, 0),
]
_RATIO_COLS = [
    ("tok/s", "throughput_tok_s"),
    ("decode tok/s", "decode_tok_s"),
    ("TTFT p50", "ttft_p50"),
    ("TTFT p99", "ttft_p99"),
    ("TPOT p50", "tpot_p50"),
    ("TPOT p99", "tpot_p99"),
    ("E2E p50", "e2e_p50"),
    ("SLO both", "slo_both"),
]


def _markdown(plan: Plan, report: dict[str, Any]) -> list[str]:
    m = report["machine"]
    slo = report["slo"]
    lines = [
        f"# {plan.title}" + (" (quick)" if report["quick"] else ""),
        "",
        f"Machine: {m['arch']} {m['cores']} cores, jax {m['jax']} ({m['backend']}); "
        f"SmolLM2-135M (cara-jax and HF+PEFT float32, llama.cpp its Q4_1 GGUF); {report['date']}. "
        f"Adapters target {', '.join(TARGET_SETS[plan.targets])}. Greedy decoding, EOS ignored. "
        f"SLOs: TTFT {slo['ttft_s']:g} s, TPOT {slo['tpot_s'] * 1e3:g} ms (attainment in %). "
        "cara-jax is the engine `cara-serve` builds, through its own flag parser: its defaults, "
        "or the flags the system notes list.",
        "",
    ]
    for n in plan.notes:
        lines += [n, ""]
    for label, why in report["skipped"].items():
        lines += [f"Skipped {label}: {why}", ""]
    sysd = report["systems"]
    for i, p in enumerate(report["points"]):
        spec = WorkloadSpec.from_dict(p["workload"]) if p["workload"] else None
        lines += [f"## {p['label']}", ""]
        if spec:
            lines += [f"Workload: {describe(spec)}.", ""]
        lines += [
            "| system | " + " | ".join(c[0] for c in _COLS) + " |",
            "|---|" + "---:|" * len(_COLS),
        ]
        for label, e in sysd.items():
            s = e["points"][i]["summary"]
            cells = [metrics.fmt(s.get(k), sc, d) for _, k, sc, d in _COLS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if plan.name == "cold_start":
            lines += [
                "",
                "TTFT of the requests whose adapter was not on the device when they "
                "arrived (cached mode preloads every adapter, so it has none):",
                "",
                "| mode | cold requests | TTFT p50 s | TTFT p90 s | TTFT p99 s | all TTFT p50 s |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for label, e in sysd.items():
                s = e["points"][i]["summary"]
                keys = ("cold_ttft_p50", "cold_ttft_p90", "cold_ttft_p99", "ttft_p50")
                cells = [str(int(s.get("cold_requests", 0)))] + [
                    metrics.fmt(s.get(k)) for k in keys
                ]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines += ["", _cold_goal(sysd, i)]
        rows = [r for r in report["ratios"] if r["point"] == p["label"]]
        if rows:
            better = (
                "mode vs cached: > 1 means the mode is faster than cached"
                if plan.name == "cold_start"
                else "> 1 means cara-jax is ahead"
            )
            lines += [
                "",
                f"Ratios, same run ({better}; latencies as baseline / ours):",
                "",
                "| ours | vs | " + " | ".join(c[0] for c in _RATIO_COLS) + " |",
                "|---|---|" + "---:|" * len(_RATIO_COLS),
            ]
            for r in rows:
                cells = [_times(r["ratios"].get(k)) for _, k in _RATIO_COLS]
                lines.append(f"| {r['ours']} | {r['baseline']} | " + " | ".join(cells) + " |")
        infos = [
            (label, e["points"][i]["info"]) for label, e in sysd.items() if e["points"][i]["info"]
        ]
        if infos:
            lines += [
                "",
                "System notes: "
                + "; ".join(
                    f"{label}: "
                    + ", ".join(
                        f"{k} {_short(v)}" for k, v in info.items() if not isinstance(v, dict)
                    )
                    for label, info in infos
                ),
            ]
        lines.append("")
    return lines


def _cold_goal(sysd: dict[str, Any], i: int) -> str:
    """TTFT of each mode as a multiple of cached mode's (the goal: auto <= 1.10x at p50 and
    <= 1.3x at p99; TPOT p50 within 10%)."""
    by_mode = {label.split("[")[-1].split(",")[0].rstrip("]"): e for label, e in sysd.items()}
    ref = by_mode.get("cached")
    if ref is None:
        return "No cached-mode run to compare with."
    parts = []
    for q in (50, 99):
        base = ref["points"][i]["summary"].get(f"ttft_p{q}", math.nan)
        if not base:
            continue
        rel = [
            f"{m} {_times(metrics.div(e['points'][i]['summary'].get(f'ttft_p{q}'), base))}"
            for m, e in by_mode.items()
            if m != "cached"
        ]
        parts.append(f"p{q}: " + ", ".join(rel))
    base = ref["points"][i]["summary"].get("tpot_p50")
    tpot = [f"{m} {_times(metrics.div(e['points'][i]['summary'].get('tpot_p50'), base))}"
            for m, e in by_mode.items() if m != "cached"]  # fmt: skip
    return (
        "TTFT as a multiple of cached mode's (goal: auto ≤ 1.10× at p50, ≤ 1.3× at p99): "
        + "; ".join(parts)
        + ". TPOT p50 as a multiple of cached mode's (goal: auto within 10%): "
        + ", ".join(tpot)
        + "."
    )


def _times(v: float | None) -> str:
    cell = metrics.fmt(v)
    return cell if cell == "–" else cell + "×"


def _short(v: Any) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def write(plan: Plan, report: dict[str, Any], raw: dict[str, Any], out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = _scrub("\n".join(_markdown(plan, report)))
    pngs = _plots(plan, report, out, stem)
    report["plots"] = [p.name for p in pngs]
    if pngs:
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n"
    save_report(out / stem, text, _clean(report))
    (out / f"{stem}_requests.json").write_text(json.dumps(_clean(raw)))


REPO_ROOT = Path(__file__).resolve().parents[2]


def _scrub(text: str) -> str:
    """Error texts may quote local paths (an import failure, a temp file); results must not.

    The most specific path goes first: a checkout under the temp folder or the home folder is
    named ``<repo>``, not ``<tmp>/...`` (after which the repo root would no longer match)."""
    names: dict[str, str] = {}  # the first name given to a path wins
    for path, name in [(str(REPO_ROOT), "<repo>"), (tempfile.gettempdir(), "<tmp>"),
                       (str(Path.cwd()), "<repo>"), (str(Path.home()), "~")]:  # fmt: skip
        if len(path) > 1:
            names.setdefault(path, name)
    for path in sorted(names, key=len, reverse=True):
        text = text.replace(path, names[path])
    return text


def _clean(v: Any) -> Any:
    """JSON without NaN (null instead), so any JSON reader takes the files; no local paths."""
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, str):
        return _scrub(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    return v


def _plots(plan: Plan, report: dict[str, Any], out: Path, stem: str) -> list[Path]:
    sysd = report["systems"]
    if not sysd:
        return []
    xs = [p["x"] for p in report["points"]]

    def series(keys: list[str], scale: dict[str, float] | None = None):
        sc = scale or {}
        return {
            label: {
                k: [pt["summary"].get(k, math.nan) * sc.get(k, 1) for pt in e["points"]]
                for k in keys
            }
            for label, e in sysd.items()
        }

    if plan.name == "load_sweep":
        keys = ["ttft_p50", "ttft_p99", "tpot_p50", "e2e_p50", "throughput_tok_s"]
        return [
            plots.line_plot(
                out / f"{stem}.png",
                xs,
                series(keys, {"tpot_p50": 1e3}),
                [
                    ("ttft_p50", "TTFT p50 (s)"),
                    ("ttft_p99", "TTFT p99 (s)"),
                    ("tpot_p50", "TPOT p50 (ms)"),
                    ("e2e_p50", "end-to-end p50 (s)"),
                ],
                plan.xlabel,
                plan.title,
                logx=True,
            )
        ]
    if plan.name == "adapters_sweep":
        keys = ["throughput_tok_s", "decode_tok_s", "tpot_p50"]
        return [
            plots.line_plot(
                out / f"{stem}.png",
                xs,
                series(keys, {"tpot_p50": 1e3}),
                [
                    ("throughput_tok_s", "throughput (tok/s)"),
                    ("decode_tok_s", "decode throughput (tok/s)"),
                    ("tpot_p50", "TPOT p50 (ms)"),
                ],
                plan.xlabel,
                plan.title,
                logx=True,
            )
        ]
    if plan.name == "cold_start":
        labels = list(sysd)
        bars = {
            f"TTFT p{q}": [
                sysd[x]["points"][0]["summary"].get(f"ttft_p{q}", math.nan) for x in labels
            ]
            for q in (50, 90, 99)
        }
        return [
            plots.bar_plot(
                out / f"{stem}.png",
                labels,
                bars,
                "TTFT (s)",
                f"Cold-start TTFT by mode, {plan.points[0].spec.num_requests} requests "
                f"(emulated {plan.cara[0][1].link_gbps:g} GB/s link, disk tier)",
            )
        ]
    labels = list(sysd)
    bars = {
        "output tok/s": [sysd[x]["points"][0]["summary"]["throughput_tok_s"] for x in labels],
        "decode tok/s": [sysd[x]["points"][0]["summary"]["decode_tok_s"] for x in labels],
    }
    return [plots.bar_plot(out / f"{stem}.png", labels, bars, "tokens / s", plan.title)]
