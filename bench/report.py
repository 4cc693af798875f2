"""What a benchmark reports: its section of docs/benchmarks.md (replaced when there, appended when not),
the machine and library versions it ran on, and the `pi-lora eval` results it reads."""

from __future__ import annotations

import json
import os
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
GIB = 2**30


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


def versions() -> str:
    """The versions of the libraries a training step runs on, those installed."""
    import importlib.metadata as md

    found = []
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(found)


def plan_cell(r: dict) -> str:
    """A table cell: the plan's peak for a point, in GiB."""
    return f"{r['planned'] / GIB:.2f}" if r.get("planned") else "-"


def device_name(dry: bool) -> str:
    """The GPU a study ran on, or that it was a dry run on the CPU."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() and not dry else "CPU (dry run)"


def results(folder: Path) -> list[dict]:
    """The results of each model (or rope setting) in a `pi-lora eval` output folder, in order; [] when none."""
    path = folder / "results.json"
    return list(json.loads(path.read_text())["results"].values()) if path.is_file() else []
