"""Render `pi-lora eval` results.json files as markdown tables (for docs/results.md).

    python bench/results_table.py eval/smollm2/*/results.json
"""

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    rows = {}
    for path in paths:
        for _label, r in json.loads(Path(path).read_text())["results"].items():
            rows[f"{Path(path).parent.name}"] = r
    lengths = sorted({int(n) for r in rows.values() for n in r["perplexity"]})
    print("| model | " + " | ".join(f"{n:,}" for n in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for name, r in rows.items():
        cells = [f"{r['perplexity'][str(n)]:.1f}" if str(n) in r["perplexity"] else "-" for n in lengths]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    bins = sorted({b for r in rows.values() for b in r["by_position"]}, key=lambda b: int(b.split("-")[0]))
    print("| model (positions) | " + " | ".join(bins) + " |")
    print("|---|" + "---|" * len(bins))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r['by_position'].get(b, float('nan')):.1f}" for b in bins) + " |")
    if any("passkey" in r for r in rows.values()):
        print("\n| model | passkey length | k_max |\n|---|---|---|")
        for name, r in rows.items():
            if "passkey" in r:
                print(f"| {name} | {r['passkey']['length']:,} | {r['passkey']['k_max']:,} |")


if __name__ == "__main__":
    main(sys.argv[1:])
