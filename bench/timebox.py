"""Time boxes for the GPU scripts: every step a process of its own, ended cleanly before its cap,
and outputs small enough to travel (a few files, shallow folders).

    box = Box(540, reserve=20)            # the whole call: 9 minutes, 20 s kept for the report
    ended = run(cmd, box.cap(120), log)   # at most 120 s, or what the box has left
    ended.capped                          # True: the step was stopped at its cap
    steps = Steps(box, logs, env, "study")
    steps.run("train-A", cmd, 200)        # the same, logged to logs/train-A.log; trouble is a note

A step is stopped by SIGTERM to its process group `grace` seconds before its cap (`pi-lora train`
then saves its last completed step and exits), and killed at the cap; so a step never outlives its
cap, and what it left behind is cleaned up by the caller's `finally`, not by a hard stop outside.
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

LIMITS = {"files": 8, "depth": 2, "file_mib": 16, "total_mib": 64}  # what one call may bring back
REPO = Path(__file__).resolve().parent.parent


class Box:
    """A deadline for a whole script; each step's cap is its own or what is left, whichever is less."""

    def __init__(self, seconds: float, reserve: float = 0.0):
        self.began, self.seconds, self.reserve = time.monotonic(), seconds, reserve

    def spent(self) -> float:
        return time.monotonic() - self.began

    def left(self) -> float:
        return max(0.0, self.seconds - self.reserve - self.spent())

    def cap(self, wanted: float) -> float:
        return min(wanted, self.left())


@dataclass
class Ended:
    rc: int | None
    seconds: float
    capped: bool
    output: str  # the last lines of its output (all of it is in the log, when one is given)


def run(cmd: list, cap: float, log: Path | None = None, env: dict | None = None, grace: float = 10.0) -> Ended:
    """Run `cmd` in a process group of its own; SIGTERM at cap - grace, SIGKILL at the cap."""
    began = time.monotonic()
    grace = min(grace, cap / 3)
    sink = open(log, "w") if log else subprocess.PIPE
    try:
        if log:
            sink.write(" ".join(map(str, cmd)) + "\n\n")
            sink.flush()
        proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=sink, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        capped = False
        try:
            out, _ = proc.communicate(timeout=max(0.0, cap - grace))
        except subprocess.TimeoutExpired:
            capped = True
            out = stop(proc, grace)
        except BaseException:  # the caller is interrupted: the step stops with it
            stop(proc, grace)
            raise
        signal_group(proc, signal.SIGKILL)  # anything it started and left running
    finally:
        if log:
            sink.close()
    text = log.read_text(errors="replace") if log else (out or "")
    return Ended(proc.returncode, time.monotonic() - began, capped, "\n".join(text.splitlines()[-30:]))


class Steps:
    """A script's steps in one Box, each a process of its own with its log in `logs`; a step that was
    not run, was stopped at its cap or failed is a note, and the steps after it still run."""

    def __init__(self, box: Box, logs: Path, env: dict | None = None, who: str = "step"):
        self.box, self.logs, self.env, self.who = box, logs, env, who
        self.notes: list[str] = []

    def run(self, name: str, cmd: list, wanted: float, grace: float = 3.0) -> dict:
        """At most `wanted` seconds, or what the box has left (under 10 s left: not run); what happened."""
        cap = self.box.cap(wanted)
        if cap < min(10.0, wanted):
            self.notes.append(f"{name}: not run, the time box was spent")
            return {"rc": None, "capped": True, "seconds": 0}
        ended = run(cmd, cap, self.logs / f"{name}.log", self.env, grace)
        say(self.who, f"{name}: rc {ended.rc}, {ended.seconds:.0f} s of {cap:.0f}{' (capped)' if ended.capped else ''}")
        if ended.capped:
            self.notes.append(f"{name}: stopped at its cap ({cap:.0f} s)")
        elif ended.rc:
            last = ended.output.splitlines()[-1][:200] if ended.output else ""
            self.notes.append(f"{name}: failed (rc {ended.rc}): {last}")
        return {"rc": ended.rc, "capped": ended.capped, "seconds": round(ended.seconds, 1)}


def say(who: str, text: str) -> None:
    """A line of the script's own log, with the time."""
    print(f"[{who} {time.strftime('%H:%M:%S')}] {text}", flush=True)


def offline_env(home: Path) -> dict:
    """The environment of a step that runs this checkout's pi-lora: its own PI_LORA_HOME, unbuffered
    output, and no hub (everything a step needs is on the machine already)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "PI_LORA_HOME": str(home), "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def stop(proc: subprocess.Popen, grace: float) -> str | None:
    """SIGTERM to the step's process group, SIGKILL after `grace` seconds; what it printed."""
    signal_group(proc, signal.SIGTERM)
    try:
        return proc.communicate(timeout=grace)[0]
    except subprocess.TimeoutExpired:
        signal_group(proc, signal.SIGKILL)
        return proc.communicate()[0]


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_cleanly_on_sigterm() -> None:
    """A SIGTERM from outside (a scheduler, `timeout`) unwinds like Ctrl-C, so `finally` blocks run."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def outputs_problems(folder: Path, files: int = LIMITS["files"], depth: int = LIMITS["depth"],
                     file_mib: float = LIMITS["file_mib"], total_mib: float = LIMITS["total_mib"]) -> list[str]:
    """Why `folder` would not travel back whole: too many files, files too deep (a file in
    folder/a/b/ is two folders deep), a file too big, or too many bytes in all."""
    found = [p for p in folder.rglob("*") if p.is_file() or p.is_symlink()]
    problems = [f"{len(found)} files (at most {files})"] if len(found) > files else []
    deep = [str(p.relative_to(folder)) for p in found if len(p.relative_to(folder).parts) - 1 > depth]
    problems += [f"too deep (at most {depth} folders): {', '.join(deep[:3])}"] if deep else []
    sizes = {str(p.relative_to(folder)): p.lstat().st_size / 2**20 for p in found}
    big = [f"{name} ({mib:.1f} MiB)" for name, mib in sizes.items() if mib > file_mib]
    problems += [f"over {file_mib:g} MiB: {', '.join(big[:3])}"] if big else []
    total = sum(sizes.values())
    return problems + ([f"{total:.1f} MiB in all (at most {total_mib:g})"] if total > total_mib else [])


def pack(archive: Path, root: Path, skip: tuple[str, ...] = ()) -> Path:
    """`root` as one .tar.gz, leaving out paths with a part named in `skip` (weights, checkpoints)."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if path.is_file() and not set(rel.parts) & set(skip):
                tar.add(path, arcname=str(Path(root.name) / rel))
    return archive


def unpacked(folder: Path, name: str, work: Path) -> Path | None:
    """folder/NAME, or folder/NAME.gz (carried compressed) unpacked into `work`; None when neither is there."""
    if (folder / name).is_file():
        return folder / name
    packed = folder / f"{name}.gz"
    if not packed.is_file():
        return None
    (work / name).write_bytes(gzip.decompress(packed.read_bytes()))
    return work / name
