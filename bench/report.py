"""Shared output of the benches: print the Markdown table, write it and the raw JSON."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out_dir: str | Path, stem: str, lines: list[str], data: dict) -> str:
    text = "\n".join(lines)
    print(text)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    return text
