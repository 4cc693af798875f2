"""The README's first command, timed: `pi-lora train --recipe demo` then `pi-lora eval runs/demo --quick`
from an empty PI_LORA_HOME (so the demo base is built), optionally beside one CPU-bound process per core.

    python bench/demo_speed.py                      # as the machine is
    python bench/demo_speed.py --load cores         # one busy-looping process per core beside it
    python bench/demo_speed.py --wait active        # OpenMP threads spin while waiting (pi-lora sets PASSIVE)
    python bench/demo_speed.py --write              # also write the figures into docs/benchmarks.md

Prints wall and CPU seconds per phase (the demo base's build is read from its progress line) and the
load average, since on a shared machine the wall time says as much about the neighbours as about us.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- demo_speed begin -->", "<!-- demo_speed end -->"


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], env: dict, cwd: Path) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (all threads) and the output of one `pi-lora` command."""
    cpu, began = children_cpu(), time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pi_lora", *argv], env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        sys.exit(f"pi-lora {' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return wall, children_cpu() - cpu, done.stdout


def burners(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def first_run(load: int, wait: str | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="pi-lora-demo-speed-") as scratch:
        work = Path(scratch)
        env = {**os.environ, "PI_LORA_HOME": str(work / "home"), "PYTHONPATH": str(ROOT),
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.pop("OMP_WAIT_POLICY", None)
        if wait:
            env["OMP_WAIT_POLICY"] = wait.upper()
        busy = burners(load)
        try:
            before = os.getloadavg()[0]
            train = timed(["train", "--recipe", "demo"], env, work)
            evaluate = timed(["eval", "runs/demo", "--quick"], env, work)
            after = os.getloadavg()[0]
        finally:
            for process in busy:
                process.kill()
                process.wait()
        built = re.search(r"^demo base: [\d,]+/[\d,]+ .*?, ([\d,]+)s \(done\)", train[2], re.M)

    return {"load": load, "wait": wait or "pi-lora's (PASSIVE)", "loadavg": (before, after),
            "base_s": float(built.group(1).replace(",", "")) if built else None,
            "train": train[:2], "eval": evaluate[:2], "table": evaluate[2]}


def row(r: dict) -> str:
    total_wall = r["train"][0] + r["eval"][0]
    total_cpu = r["train"][1] + r["eval"][1]
    base = f"{r['base_s']:.0f}" if r["base_s"] is not None else "?"
    return (f"| {r['load']} | {r['wait']} | {r['loadavg'][0]:.1f}-{r['loadavg'][1]:.1f} | {base} | "
            f"{r['train'][0]:.0f} ({r['train'][1]:.0f}) | {r['eval'][0]:.0f} ({r['eval'][1]:.0f}) | "
            f"**{total_wall:.0f}** ({total_cpu:.0f}) |")


HEADER = ("| busy processes beside it | OpenMP wait | load average (before-after) | demo base s | train s (CPU s) "
          "| eval s (CPU s) | first run s (CPU s) |\n|---|---|---|---|---|---|---|")


def write(rows: list[str]) -> None:
    text = DOC.read_text()
    section = (f"{BEGIN}\n## The demo's first run, {time.strftime('%Y-%m-%d')}, x86_64 CPU, {os.cpu_count()} cores\n\n"
               "`pi-lora train --recipe demo` then `pi-lora eval runs/demo --quick` from an empty PI_LORA_HOME "
               "(the demo base built first), timed by `python bench/demo_speed.py` (`--load cores`: one busy-looping "
               "process per core beside it). The train column includes the base. CPU seconds are summed over "
               "threads: about what the work would take on one idle core.\n\n"
               f"{HEADER}\n" + "\n".join(rows) + f"\n{END}")
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda m: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", default="0", help="busy processes beside the run: a number, or 'cores'")
    parser.add_argument("--wait", choices=["passive", "active"], default=None,
                        help="OMP_WAIT_POLICY for the run (default: pi-lora's own, PASSIVE)")
    parser.add_argument("--write", action="store_true", help="add the row to docs/benchmarks.md's section")
    args = parser.parse_args()
    load = os.cpu_count() if args.load == "cores" else int(args.load)
    result = first_run(load, args.wait)
    print(HEADER)
    print(row(result))
    print(result["table"][-2500:])
    if args.write:
        rows = []
        if BEGIN in DOC.read_text():
            rows = [line for line in DOC.read_text().split(BEGIN)[1].split(END)[0].splitlines()
                    if line.startswith("| ") and not line.startswith("| busy")]
        write(rows + [row(result)])


if __name__ == "__main__":
    main()
