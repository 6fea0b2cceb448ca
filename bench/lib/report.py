"""Shared output of the benches: print the Markdown report, write it and the raw JSON beside it.

Every bench ends here, so results land the same way: ``<stem>.md`` (what a reader opens) and
``<stem>.json`` (the numbers it was made from) in one folder. A re-run rewrites the generated
part of the .md; what a person wrote below the ``NOTES`` marker line (earlier runs' rows, the
reading of the numbers) is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

NOTES = "<!-- notes: written by hand, kept when the bench rewrites this report -->"


def save_report(out: str | Path, text: str, data: dict | list) -> str:
    """Print ``text`` and write ``out`` + ".md" and ``out`` + ".json" (``out`` has no suffix, or
    one that is replaced), keeping the old .md's hand-written notes; returns the text."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = text.rstrip("\n") + "\n"
    print(text, end="")
    md = out.with_suffix(".md")
    old = md.read_text() if md.is_file() else ""
    if NOTES in old:
        text += "\n" + old[old.index(NOTES) :].rstrip("\n") + "\n"
    md.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    return text


def write_report(out_dir: str | Path, stem: str, lines: list[str], data: dict) -> str:
    """``save_report`` for a folder and a file stem, from the report's lines."""
    return save_report(Path(out_dir) / stem, "\n".join(lines), data)
