"""The run folder: the contract between `train` and every later command.

    runs/<name>/
      recipe.yaml          resolved recipe: `pi-lora train --recipe runs/<name>/recipe.yaml` repeats the run
      pi_lora.json         base, revision, original/target length, factor, rope type and theta, versions
      adapter/             PEFT adapter (incl. trained embed/norm), written at the end
      metrics.jsonl        one JSON line per logged step
      checkpoints/step-N/  adapter/ + state.pt (trainable weights, optimizer, scheduler, RNG, data position)
      best.json            the step and checkpoint with the lowest validation loss (when validating)
      tensorboard/         event files (train.report_to)
      outputs.json         what merge/export/eval made from the run, and from which adapter step
      merged/, peft/, <name>-<outtype>.gguf, eval/   those outputs, by default

Every file and folder is written under a temporary name and renamed, so a kill at any moment
leaves either the old complete thing or the new complete thing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import PiLoraError

RECIPE, META, ADAPTER, METRICS, CHECKPOINTS, STATE, BEST, OUTPUTS = (
    "recipe.yaml", "pi_lora.json", "adapter", "metrics.jsonl", "checkpoints", "state.pt", "best.json",
    "outputs.json",
)
# What later commands make from a run, by default inside it, named by what they are.
MERGED, PEFT, EVAL = "merged", "peft", "eval"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(path: Path) -> None:
    """Give a temporary file or folder (0600/0700 from mkstemp/mkdtemp) the umask's usual modes, so a
    merged model or adapter can be read by whoever serves it."""
    mask = _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    publish(Path(tmp))
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        publish(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def claim(folder: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train into a non-empty folder unless told to resume or to overwrite a run folder."""
    if resume and overwrite:
        raise PiLoraError("--resume and --overwrite contradict each other; give one.")
    if folder.exists() and not folder.is_dir():
        raise PiLoraError(f"output '{folder}' is a file, not a folder.")
    busy = folder.is_dir() and any(folder.iterdir())
    if busy and overwrite and not ((folder / RECIPE).is_file() or (folder / META).is_file()):
        raise PiLoraError(f"--overwrite replaces run folders only; '{folder}' holds other files.")
    if resume and not (folder / RECIPE).is_file():
        raise PiLoraError(f"nothing to resume: '{folder}' holds no {RECIPE}.")
    if busy and not (resume or overwrite):
        raise PiLoraError(
            f"output folder '{folder}' is not empty; add --resume to continue that run "
            "or --overwrite to replace it."
        )


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of a killed save are not listed)."""
    root = folder / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def prune(folder: Path, keep: int, protect: int | None = None) -> None:
    """Keep the newest `keep` checkpoints, and the one of step `protect` (the best by validation)."""
    for old in checkpoints(folder)[:-keep]:
        if old.name != f"step-{protect}":
            shutil.rmtree(old, ignore_errors=True)


def gguf_name(folder: Path, outtype: str) -> Path:
    """The default GGUF file of a run: RUN/<run name>-<outtype>.gguf."""
    return folder / f"{Path(folder).resolve().name}-{outtype}.gguf"


def record_output(folder: Path, path: Path, kind: str) -> None:
    """Note in the run which adapter step an output (merged model, export, evaluation) was made from."""
    step = read_meta(folder).get("adapter_step")
    outputs = [o for o in read_outputs(folder) if o["path"] != str(Path(path).resolve())]
    outputs.append({"path": str(Path(path).resolve()), "kind": kind, "adapter_step": step})
    write_json(folder / OUTPUTS, {"outputs": outputs})


def read_outputs(folder: Path) -> list[dict]:
    path = Path(folder) / OUTPUTS
    return json.loads(path.read_text())["outputs"] if path.is_file() else []


def stale_outputs(folder: Path, step: int) -> list[dict]:
    """Outputs that still exist and were made from an adapter of another step."""
    return [o for o in read_outputs(folder) if Path(o["path"]).exists() and o["adapter_step"] != step]


def read_meta(folder: Path) -> dict:
    path = Path(folder) / META
    if not path.is_file():
        raise PiLoraError(f"'{folder}' is not a pi-lora run folder: it has no {META}.")
    return json.loads(path.read_text())


def append_metrics(folder: Path, record: dict) -> None:
    with open(folder / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(folder: Path) -> list[dict]:
    path = folder / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            break
    return rows


def truncate_metrics(folder: Path, step: int) -> None:
    """Drop lines after `step`: a resumed run recomputes those steps."""
    rows = [r for r in read_metrics(folder) if r["step"] <= step]
    write_text(folder / METRICS, "".join(json.dumps(r) + "\n" for r in rows))
