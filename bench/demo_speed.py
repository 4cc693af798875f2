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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
HEADING = "## The demo's first run"
# what the rows showed, kept under them when a run adds a row
NOTES = """\
Threads under load: with OpenMP's default waiting (threads spin while they wait for each other), one
step of the demo base's pretraining took 2.76 s on the 2 cores at load average 7, against 0.55 s with
`OMP_WAIT_POLICY=PASSIVE` and 0.53 s with one thread (`torch.set_num_threads(1)`; 20 steps each): a
thread spinning for a partner that another process has taken the core from wastes its time slice.
`pi-lora` sets `OMP_WAIT_POLICY=PASSIVE` unless the environment sets it; one thread gained nothing over
two passive ones at that load (0.47 against 0.52 s per step, 5.3 against 4.9 CPU-seconds), so the
thread count stays torch's default. End to end (the rows above), spinning threads made the first run 1,459 s against 249 s. Idle cores were not to be had for these runs; the CPU-seconds bound
what idle cores would take (about 110 in all, 75 of them the base's 300 pretraining steps). The eval's
26 s include the passkey check (the key right before the question, 2 trials per model), which finds
that none of the three demo models can retrieve a key and skips the distances.
"""


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
    """This benchmark's section of docs/benchmarks.md (bench/report.py), its rows kept across runs."""
    section = (f"{HEADING}, {time.strftime('%Y-%m-%d')}, x86_64 CPU, {os.cpu_count()} cores\n\n"
               "`pi-lora train --recipe demo` then `pi-lora eval runs/demo --quick` from an empty PI_LORA_HOME "
               "(the demo base built first), timed by `python bench/demo_speed.py` (`--load cores`: one busy-looping "
               "process per core beside it). The train column includes the base. CPU seconds are summed over "
               "threads: about what the work would take on one idle core.\n\n"
               f"{HEADER}\n" + "\n".join(rows) + "\n\n" + NOTES)
    write_section(HEADING, section, DOC)


def recorded_rows() -> list[str]:
    """The rows already in this benchmark's section of the doc."""
    text = DOC.read_text() if DOC.exists() else ""
    if HEADING not in text:
        return []
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| busy")]


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
        write(recorded_rows() + [row(result)])


if __name__ == "__main__":
    main()
