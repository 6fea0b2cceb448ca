"""Shared output of the benches: print the Markdown report, write it and the raw JSON beside it.

Every bench ends here, so results land the same way: ``<stem>.md`` (what a reader opens) and
``<stem>.json`` (the numbers it was made from) in one folder.
"""

from __future__ import annotations

import json
from pathlib import Path


def save_report(out: str | Path, text: str, data: dict | list) -> str:
    """Print ``text`` and write ``out`` + ".md" and ``out`` + ".json" (``out`` has no suffix, or
    one that is replaced); returns the text."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = text.rstrip("\n") + "\n"
    print(text, end="")
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    return text


def write_report(out_dir: str | Path, stem: str, lines: list[str], data: dict) -> str:
    """``save_report`` for a folder and a file stem, from the report's lines."""
    return save_report(Path(out_dir) / stem, "\n".join(lines), data)
