"""Write a benchmark's section of docs/benchmarks.md: replaced when there, appended when not."""

from __future__ import annotations

import os
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def write_section(heading: str, text: str, path: Path = BENCHMARKS) -> None:
    """`text` starts with its own "## " heading line; the section whose heading starts with `heading`
    (up to the next "## " heading) is replaced by it. Written to a temporary file, then renamed."""
    lines = path.read_text().splitlines() if path.exists() else []
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    new = text.strip("\n").splitlines()
    if start is None:
        lines += [""] + new
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = new + ([""] if end < len(lines) else [])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
