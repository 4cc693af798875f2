"""Render `pi-lora eval` results.json files as markdown tables (for docs/results.md).

    python bench/results_table.py eval/smollm2/*/results.json

A row per model (and rope setting); a file holding one model is named by its folder.
"""

import json
import sys
from pathlib import Path


def rows_of(paths: list[str]) -> dict:
    rows = {}
    for path in paths:
        results = json.loads(Path(path).read_text())["results"]
        for label, r in results.items():
            name = Path(path).parent.name
            rows[name if len(results) == 1 else f"{name}: {label.rsplit('/', 1)[-1]}"] = r
    return rows


def perplexity_table(rows: dict) -> None:
    lengths = sorted({int(n) for r in rows.values() for n in r["perplexity"]})
    context = {n: min(r["min_context"][str(n)] for r in rows.values() if str(n) in r.get("min_context", {}))
               for n in lengths}
    print("| model | " + " | ".join(f"{n:,} (ctx >= {context[n]:,})" for n in lengths) + " | scored tokens |")
    print("|---|" + "---|" * (len(lengths) + 1))
    for name, r in rows.items():
        cells = [f"{r['perplexity'][str(n)]:.1f}" if str(n) in r["perplexity"] else "-" for n in lengths]
        counts = ", ".join(f"{c:,}" for c in sorted(set(r["scored_tokens"].values())))
        print(f"| {name} | " + " | ".join(cells) + f" | {counts} |")


def position_table(rows: dict) -> None:
    bins = sorted({b for r in rows.values() for b in r["by_position"]}, key=lambda b: int(b.split("-")[0]))
    print("| model (positions) | " + " | ".join(bins) + " |")
    print("|---|" + "---|" * len(bins))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r['by_position'].get(b, float('nan')):.1f}" for b in bins) + " |")


def passkey_table(rows: dict) -> None:
    found = [(name, int(n), e) for name, r in rows.items() for n, e in (r.get("passkey") or {}).items()]
    if not found:
        return
    print("\n| model | prompt | trials | k_max | accuracy by distance from the question |\n|---|---|---|---|---|")
    for name, length, e in found:
        acc = ", ".join(f"{int(k):,}: {v:.0%}" for k, v in e["accuracy"].items())
        print(f"| {name} | {length:,} | {e['trials']} | {e['k_max']:,} | {acc} |")


def main(paths: list[str]) -> None:
    rows = rows_of(paths)
    measured = {name: r for name, r in rows.items() if "perplexity" in r}  # `--no-perplexity` runs have none
    if measured:
        perplexity_table(measured)
        print()
        position_table(measured)
    passkey_table(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
