"""The run folder: the contract between `train` and every later command.

    runs/<name>/
      recipe.yaml          resolved recipe: `pi-lora train --recipe runs/<name>/recipe.yaml` repeats the run
      pi_lora.json         base, revision, original/target length, factor, rope type and theta, the
                           resolved recipe, trust_remote_code, versions
      adapter/             PEFT adapter (incl. trained embed/norm), written at the end
      metrics.jsonl        one JSON line per logged step
      checkpoints/step-N/  adapter/, tensors.safetensors (trainable weights, optimizer and RNG tensors)
                           and state.json (the rest, the recipe, and the size and SHA-256 of every file)
      best.json            the step and checkpoint with the lowest validation loss (when validating)
      tensorboard/         event files (train.report_to)
      outputs.json         what merge/export/eval made from the run, and from which adapter step
      merged/, peft/, <name>-<dtype>.gguf, eval/   those outputs, by default

Every file and folder is written under a temporary name and renamed (a folder swapped in by an
atomic exchange where the OS has one), so a kill at any moment leaves either the old complete thing
or the new complete thing; an old folder a kill left aside as `.<name>.pi-lora-XXXXXXXX.old` is put
back by the next command that writes or reads <name>. Temporaries are named
`.<name>.pi-lora-XXXXXXXX.tmp`, so the next command that writes <name> removes those a killed
process left. One process writes a target at a time: it holds an OS lock on `.<name>.lock` beside
the target (see `writing`), which the OS drops when the process dies, so a kill -9 leaves no
stale lock.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from .console import note
from .errors import PiLoraError, first_line, stop_if_interrupted

RECIPE, META, ADAPTER, METRICS, CHECKPOINTS, STATE, BEST, OUTPUTS = (
    "recipe.yaml", "pi_lora.json", "adapter", "metrics.jsonl", "checkpoints", "state.json", "best.json",
    "outputs.json",
)
TENSORS = "tensors.safetensors"  # a checkpoint's tensors; state.json holds the rest
# What later commands make from a run, by default inside it, named by what they are.
MERGED, PEFT, EVAL = "merged", "peft", "eval"
MARK = ".pi-lora-"  # in every temporary's name, so stale ones are found and nothing else


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


# ---------------------------------------------------------------------------------------------
# One writer per target. flock, not a PID file: the lock dies with its process (kill -9 included),
# so there is never a stale lock to break. The PID written into the file and /proc/locks only
# name the holder in the refusal.


def lock_file(target: Path) -> Path:
    """Beside the target, not inside: an output folder is replaced by a rename, which would carry an
    inside lock away with it; and one place for every kind of target makes a `train` and a `merge`
    into the same folder meet at the same lock."""
    target = Path(target).absolute()
    return target.with_name(f".{target.name}.lock")


_held: dict[Path, list] = {}  # lock file -> [fd, depth, shared]: re-entrant within a process


def _holders(path: Path) -> str:
    """Who holds the lock on `path`: 'process 123 (pi-lora train ...)', from /proc/locks on Linux."""
    try:
        st = os.stat(path)
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        pids = [line.split()[4] for line in Path("/proc/locks").read_text().splitlines()
                if "FLOCK" in line and line.split()[5] == key]
    except (OSError, IndexError):
        pids = []
    if not pids:  # no /proc: the last writer's note in the file
        try:
            pids = path.read_text().split()[:1]
        except OSError:
            pids = []
    if not pids:
        return "another process"
    return ", ".join(f"process {pid} ({_command(pid)})" for pid in dict.fromkeys(pids))


def _command(pid: str) -> str:
    try:
        parts = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "a pi-lora command"
    parts = [p for p in parts if p]
    if "pi_lora" in parts:  # python -m pi_lora train ... reads better as pi-lora train ...
        parts = ["pi-lora", *parts[parts.index("pi_lora") + 1:]]
    elif parts:
        parts[0] = Path(parts[0]).name
    return " ".join(parts)[:120]


def _acquire(path: Path, shared: bool, wait: bool) -> int | None:
    """An fd holding the lock on `path` (None: a read-only place, where nobody can write either)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise PiLoraError(f"cannot lock '{path}': {e.strerror}.") from None
            if shared and not path.exists():
                return None
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise PiLoraError(f"cannot lock '{path}': {e.strerror}.") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            who = _holders(path)
            os.close(fd)
            return _busy(path, who)
        try:  # a releasing holder may have unlinked the file between our open and our lock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            if not shared:
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()} {_command(str(os.getpid()))}\n".encode())
                except OSError:  # opened read-only: the lock holds, only the note is missing
                    pass
            return fd
        os.close(fd)


class Busy(PiLoraError):
    """Another process writes (or reads) the target."""


def _busy(path: Path, who: str):
    target = path.with_name(path.name[1:].removesuffix(".lock"))
    raise Busy(f"'{target}' is in use by {who}; wait for it to finish or use another output. "
               "(The lock goes away with that process.)")


def _release(path: Path, fd: int) -> None:
    try:  # the last holder removes the file (no leftovers); a holder that is not the last cannot
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)
    except (BlockingIOError, OSError):
        pass
    os.close(fd)


@contextmanager
def writing(target: Path, wait: bool = False):
    """Hold `target`'s lock for writing (a run folder, an output folder or file): refused at once,
    naming the holder, while another process writes or reads it; `wait` waits instead (caches).
    Re-entrant. Creates the target's parent folder if needed."""
    with _lock(Path(target), shared=False, wait=wait):
        yield


@contextmanager
def reading(target: Path):
    """Hold `target`'s lock for reading: any number of readers, no writer meanwhile (a merge or an
    evaluation of a run that a `train --resume` would change under it)."""
    with _lock(Path(target), shared=True, wait=False):
        yield


@contextmanager
def _lock(target: Path, shared: bool, wait: bool):
    path = lock_file(target)
    held = _held.get(path)
    if held is not None:
        if held[2] and not shared:
            raise PiLoraError(f"'{target}' is read by this command; it cannot also write it.")
        held[1] += 1
    else:
        if shared and not path.parent.is_dir():
            yield
            return
        made = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PiLoraError(f"cannot create the folder '{path.parent}': {e.strerror}.") from None
        fd = _acquire(path, shared, wait)
        if fd is None:
            yield
            return
        held = _held[path] = [fd, 1, shared, made]
    try:
        yield
    finally:
        held[1] -= 1
        if held[1] == 0:
            del _held[path]
            _release(path, held[0])
            for folder in held[3]:  # folders made only for the lock go again when nothing was written
                try:
                    folder.rmdir()
                except OSError:
                    break


def holds(target: Path) -> bool:
    """Whether this process holds the write lock of `target` or of a folder above it."""
    target = Path(target).absolute()
    for p in [target, *target.parents][:-1]:  # the root has no name, and no lock beside it
        h = _held.get(lock_file(p))
        if h is not None and not h[2]:
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Temporaries: `.<name>.pi-lora-XXXXXXXX.tmp[.suffix]` beside <name>.


def _temp_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}{re.escape(MARK)}\w{{8}}\.(tmp|old)(\.\w+)?$")


def _size(path: Path) -> int:
    try:
        if path.is_dir() and not path.is_symlink():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        return path.lstat().st_size
    except OSError:
        return 0


def sweep(target: Path) -> list[Path]:
    """Remove the temporaries a killed process left for `target`, and say so. Only while this process
    holds `target`'s write lock (or its folder's): then no live process is writing them."""
    target = Path(target).absolute()
    if not holds(target) or not target.parent.is_dir():
        return []
    recover(target)
    pattern = _temp_pattern(target.name)
    stale = [p for p in target.parent.iterdir() if pattern.match(p.name) and p not in _mine]
    for p in stale:
        size = _size(p)
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        note(f"[yellow]removed[/] {p} ({size / 2**30:.2f} GiB), a temporary left by a stopped pi-lora process")
    return stale


def recover(target: Path) -> Path | None:
    """Put back the previous `target` that a process killed between the two renames of a replacement
    left as `.<name>.pi-lora-XXXXXXXX.old`, when `target` itself is gone. The caller keeps writers out
    (it holds the target's write lock, or a read lock of the run that holds it)."""
    target = Path(target)
    if target.exists() or target.is_symlink() or not target.parent.is_dir():
        return None
    pattern = _temp_pattern(target.name)
    old = [p for p in target.parent.iterdir()
           if pattern.match(p.name) and p.name.endswith(".old") and p.absolute() not in _mine]
    if not old:
        return None
    newest = max(old, key=lambda p: p.lstat().st_mtime)
    try:
        newest.rename(target)
    except OSError:  # another reader put it back first
        return None
    note(f"[yellow]restored[/] {target} from {newest.name}, which a stopped pi-lora process left")
    return target


_mine: set[Path] = set()  # temporaries of this process: never stale while it runs (a scratch folder
# and the file written beside it for the same output)


def _old_name(final: Path) -> Path:
    """Where a replaced `final` waits until its replacement is in place."""
    old = _temp_name(final).with_suffix(".old")
    _mine.add(old.absolute())
    return old


def _temp_name(final: Path, suffix: str = "") -> Path:
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    token = "".join(secrets.choice(alphabet) for _ in range(8))
    name = Path(final).absolute().with_name(f".{Path(final).name}{MARK}{token}.tmp{suffix}")
    _mine.add(name)
    return Path(final).with_name(name.name)


def temp_file(final: Path, suffix: str = "") -> Path:
    """A new temporary path beside `final` for a file to be renamed onto it (`suffix`, e.g. '.gguf',
    for readers that go by it); a later `sweep(final)` finds it if this process dies."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep(final)
    return _temp_name(final, suffix)


@contextmanager
def scratch(final: Path):
    """A temporary folder beside `final` for intermediate work (removed after; swept if killed)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep(final)
    tmp = _temp_name(final)
    try:  # made inside the try: a signal just after mkdir still removes it
        tmp.mkdir(mode=0o700)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    tmp = _temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp)
        put_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def put_file(tmp: Path, final: Path) -> None:
    """Rename a finished temporary file onto `final`, unless Ctrl-C or SIGTERM came and something
    swallowed its KeyboardInterrupt (a __del__): then nothing is replaced."""
    stop_if_interrupted()
    os.replace(tmp, final)


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename.
    Stale temporaries of `final` are removed first when this process holds its lock."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PiLoraError(f"cannot create the folder '{final.parent}': {e.strerror}.") from None
    sweep(final)
    tmp = _temp_name(final)
    try:  # made inside the try: a signal just after mkdir still removes it
        tmp.mkdir(mode=0o700)
        with disk_full_named(final):
            yield tmp
            stop_if_interrupted()
            publish(tmp)
            replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def disk_full_named(final: Path):
    """A write of `final` that fails on a full disk is one line naming `final` and its disk: libraries
    say it otherwise (safetensors' own error, numpy's "N requested and M written", the source file)."""
    try:
        yield
    except Exception as e:
        if isinstance(e, PiLoraError):
            raise
        try:
            free = shutil.disk_usage(Path(final).absolute().parent).free
        except OSError:
            raise e from None
        if getattr(e, "errno", None) == errno.ENOSPC or free < FULL:
            raise PiLoraError(f"the disk is full: cannot write '{final}' ({free / 2**20:.0f} MiB free there). "
                              "Nothing was replaced; free some space and run again.") from None
        raise


FULL = 16 * 2**20  # a failed write with less than this left found the disk full


def replace(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` in the place of `final`. Where the OS swaps two names in one
    step, a kill at any moment leaves the old or the new `final`; elsewhere the old one is renamed
    aside first, and `recover` puts it back if a kill comes between the two renames."""
    if not (final.exists() or final.is_symlink()):
        tmp.rename(final)
        return
    if EXCHANGE and _exchange(tmp, final):  # tmp now holds the old folder
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = _old_name(final)
    final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink(missing_ok=True)


EXCHANGE = True  # use renameat2(RENAME_EXCHANGE) where the OS and filesystem have it


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE), which Python's os module does
    not wrap; False where the OS or the filesystem lacks it (the caller renames twice instead)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def check_writable(path: Path) -> None:
    """Refuse, before any work, an output path that cannot be created: one under a file, or in a
    folder this user cannot write."""
    path = Path(path).absolute()
    existing = next(p for p in [path, *path.parents] if p.exists())
    if existing != path and not existing.is_dir():
        raise PiLoraError(f"cannot create '{path}': '{existing}' is a file, not a folder.")
    folder = existing if existing.is_dir() else existing.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PiLoraError(f"cannot create '{path}': no permission to write in '{folder}'.")


# What marks each kind of output as one pi-lora wrote: --overwrite replaces those, never a user's files.
MARKS = {MERGED: META, PEFT: META, EVAL: "results.json"}


def check_output(output: Path, kind: str, overwrite: bool, inputs=()) -> None:
    """Refuse, before any work, an output this command must not write: one that is, or holds, one of
    its own `inputs`; an existing one without `overwrite` (an empty folder for an evaluation is not
    refused); and, even with it, anything but an empty folder or a pi-lora output of this `kind` (a
    folder holding MARKS[kind], a GGUF file)."""
    output = Path(output).expanduser()
    check_writable(output)
    target = output.resolve()
    for given in inputs:
        source = Path(given).expanduser()
        if source.exists() and (source.resolve() == target or target in source.resolve().parents):
            what = "is" if source.resolve() == target else "holds"
            raise PiLoraError(f"--output '{output}' {what} '{given}', which this command reads; give another output.")
    if not (output.exists() or output.is_symlink()):
        return
    if kind == "gguf":
        if output.is_dir():
            raise PiLoraError(f"--output '{output}' is a folder; give a .gguf file.")
        ours = _is_gguf(output)
    elif not output.is_dir():
        raise PiLoraError(f"--output '{output}' is a file; give a folder (the file is left alone).")
    elif not contents(output) and kind == EVAL:  # an evaluation may go into a folder made for it
        return
    else:
        ours = not contents(output) or (output / MARKS[kind]).is_file()
    if not overwrite:
        raise PiLoraError(f"output '{output}' exists; add --overwrite to replace it.")
    if not ours:
        what = "a GGUF file" if kind == "gguf" else f"a folder holding {MARKS[kind]}"
        raise PiLoraError(f"--overwrite replaces what pi-lora wrote ({what}); '{output}' is not, so it is "
                          "left alone. Give another output.")


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def contents(folder: Path) -> list[Path]:
    """What a folder holds, apart from stale temporaries (the next writer removes those)."""
    return [p for p in folder.iterdir() if MARK not in p.name] if folder.is_dir() else []


def claim(folder: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train into a non-empty folder unless told to resume or to overwrite a run folder."""
    if resume and overwrite:
        raise PiLoraError("--resume and --overwrite contradict each other; give one.")
    if folder.exists() and not folder.is_dir():
        raise PiLoraError(f"output '{folder}' is a file, not a folder.")
    check_writable(folder)
    restore_previous(folder)
    busy = bool(contents(folder))
    if busy and overwrite and not ((folder / RECIPE).is_file() or (folder / META).is_file()):
        raise PiLoraError(f"--overwrite replaces run folders only; '{folder}' holds other files.")
    if resume and not (folder / RECIPE).is_file():
        raise PiLoraError(f"nothing to resume: '{folder}' holds no {RECIPE}.")
    if busy and not (resume or overwrite):
        raise PiLoraError(
            f"output folder '{folder}' is not empty; add --resume to continue that run "
            "or --overwrite to replace it."
        )


def set_aside(folder: Path) -> Path | None:
    """For --overwrite: move the previous run beside its folder, as `.<name>.pi-lora-XXXXXXXX.old`, and
    start an empty folder (the caller holds its lock, which lies beside it). The previous run stays
    until the new one has a checkpoint: `put_back` restores it, `drop` removes it."""
    if not contents(folder):
        return None
    old = _old_name(folder)
    folder.rename(old)
    folder.mkdir()
    return old


def put_back(previous: Path, folder: Path) -> None:
    """The new run left nothing worth keeping: the previous run returns to its folder."""
    shutil.rmtree(folder, ignore_errors=True)
    previous.rename(folder)


def drop(previous: Path | None) -> None:
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def restore_previous(folder: Path) -> None:
    """A `train --overwrite` killed (kill -9) before its first checkpoint left the previous run beside
    the new one: put it back; once the new run has a checkpoint, the previous one goes. Under the
    folder's write lock (refused while another process holds it)."""
    folder = Path(folder).absolute()
    pattern = _temp_pattern(folder.name)

    def left() -> list[Path]:
        found = [p for p in folder.parent.iterdir() if pattern.match(p.name) and p.name.endswith(".old")
                 and p.is_dir() and p not in _mine] if folder.parent.is_dir() else []
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)

    if not left():
        return
    with writing(folder):  # re-entrant: most callers hold it already
        for old in left():
            if not checkpoints(folder) and not (folder / ADAPTER).exists():
                put_back(old, folder)
                note(f"[yellow]restored[/] the previous run in {folder}: a train --overwrite was stopped before "
                    "its first checkpoint")
            else:
                drop(old)


def checkpoints(folder: Path) -> list[Path]:
    """Checkpoint folders, oldest first (temporary folders of a killed save are not listed). A listed
    one may still be damaged: `checkpoint.read` verifies it."""
    root = folder / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step-"))


def fingerprint(folder: Path) -> dict[str, dict]:
    """Size and SHA-256 of every file under `folder`, by relative path: recorded when a checkpoint
    is written, checked before it is used."""
    return {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file()}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def damage(folder: Path, recorded: dict[str, dict]) -> str | None:
    """Why the files under `folder` are not the ones recorded (missing, size, content), or None."""
    for name, want in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} is {size:,} bytes, {want['size']:,} when written"
        if sha256(path) != want["sha256"]:
            return f"{name} does not hold what was written (SHA-256 differs)"
    return None


def verify_adapter(folder: Path) -> dict:
    """Check that `folder` holds a loadable LoRA adapter: adapter_config.json parses and is LoRA,
    adapter_model.safetensors is whole and its factors match the config's rank. Returns the config;
    a readable PiLoraError naming the file otherwise. (A truncated adapter copied on would load
    nowhere.)"""
    import torch
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not (config_path.is_file() and weights_path.is_file()):
        raise PiLoraError(f"no adapter in '{folder}' (adapter_config.json and adapter_model.safetensors).")
    config = read_json(config_path, "adapter config")
    if config.get("peft_type", "LORA") != "LORA" or not isinstance(config.get("r"), int):
        raise PiLoraError(f"'{config_path}' is not a LoRA adapter config (peft_type LORA with an integer r).")
    try:
        with safe_open(weights_path, "pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if ".lora_A." in key and tensor.shape[0] != config["r"] and not config.get("rank_pattern"):
                    raise PiLoraError(f"'{weights_path}': {key} has rank {tensor.shape[0]}, the config says "
                                      f"r = {config['r']}.")
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise PiLoraError(f"'{weights_path}': {key} holds NaN or infinite values.")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise PiLoraError(f"cannot read the adapter weights '{weights_path}': {first_line(e)}") from None
    return config


def read_json(path: Path, what: str = "file") -> dict:
    """A JSON object from `path`, or one readable line naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PiLoraError(f"{what} '{path}' does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PiLoraError(f"{what} '{path}' is damaged (not valid JSON: {first_line(e)}).") from None
    except OSError as e:
        raise PiLoraError(f"cannot read {what} '{path}': {e.strerror}.") from None
    if not isinstance(data, dict):
        raise PiLoraError(f"{what} '{path}' is damaged (a JSON object expected, got {type(data).__name__}).")
    return data


def require_trust(meta: dict, given: bool, command: str) -> None:
    """A run trained with --trust-remote-code runs its base's own code again in `command`: only when
    the user says so again, never because a (possibly shared) run folder says so."""
    if meta.get("trust_remote_code") and not given:
        raise PiLoraError(f"this run's base '{meta.get('base')}' runs its own model code (it was trained with "
                          f"--trust-remote-code); {command} runs it too only with --trust-remote-code.")


def prune(folder: Path, keep: int, protect: int | None = None) -> None:
    """Keep the newest `keep` checkpoints, and the one of step `protect` (the best by validation)."""
    for old in checkpoints(folder)[:-keep]:
        if old.name != f"step-{protect}":
            shutil.rmtree(old, ignore_errors=True)


def gguf_name(folder: Path, dtype: str) -> Path:
    """The default GGUF file of a run: RUN/<run name>-<dtype>.gguf."""
    return folder / f"{Path(folder).resolve().name}-{dtype}.gguf"


def record_output(folder: Path, path: Path, kind: str) -> None:
    """Note in the run which adapter step an output (merged model, export, evaluation) was made from."""
    step = read_meta(folder).get("adapter_step")
    if not os.access(folder, os.W_OK):  # a run on a read-only mount: the output is made, only not noted
        note(f"[yellow]note[/]: '{folder}' cannot be written, so {OUTPUTS} there does not list {path}.")
        return
    with writing(Path(folder) / OUTPUTS, wait=True):  # two commands may finish at once
        outputs = [o for o in read_outputs(folder) if o["path"] != str(Path(path).resolve())]
        outputs.append({"path": str(Path(path).resolve()), "kind": kind, "adapter_step": step})
        write_json(folder / OUTPUTS, {"outputs": outputs})


def read_outputs(folder: Path) -> list[dict]:
    path = Path(folder) / OUTPUTS
    if not path.is_file():
        return []
    try:
        return [o for o in json.loads(path.read_text())["outputs"] if {"path", "kind", "adapter_step"} <= set(o)]
    except (ValueError, KeyError, TypeError):  # only bookkeeping: a damaged list is started again
        note(f"[yellow]note[/]: '{path}' is damaged; its list of outputs starts again.")
        return []


def stale_outputs(folder: Path, step: int) -> list[dict]:
    """Outputs that still exist and were made from an adapter of another step."""
    return [o for o in read_outputs(folder) if Path(o["path"]).exists() and o["adapter_step"] != step]


def read_meta(folder: Path) -> dict:
    path = Path(folder) / META
    if not path.is_file():
        raise PiLoraError(f"'{folder}' is not a pi-lora run folder: it has no {META}.")
    meta = read_json(path, "run metadata")
    missing = [k for k in ("base", "original_len", "target_len", "factor", "rope_type", "rope_theta") if k not in meta]
    if missing:
        raise PiLoraError(f"run metadata '{path}' is damaged: it lacks {', '.join(missing)}.")
    return meta


def check_present(folder: Path) -> None:
    """Stop a run whose folder was deleted or moved away while it trained, rather than recreate
    orphaned files in its place."""
    if not (Path(folder) / META).is_file():
        raise deleted(folder, META)


def deleted(folder: Path, gone) -> PiLoraError:
    """The one line of a run whose folder went while it trained; `gone`: what was found missing."""
    return PiLoraError(f"the run folder '{folder}' was deleted or moved while training ({gone} is gone); "
                       "stopping without writing more.")


def append_metrics(folder: Path, record: dict) -> None:
    check_present(folder)
    with open(folder / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(folder: Path) -> list[dict]:
    path = folder / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            break
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            break
        rows.append(row)
    return rows


def truncate_metrics(folder: Path, step: int) -> None:
    """Drop lines after `step`: a resumed run recomputes those steps."""
    rows = [r for r in read_metrics(folder) if r["step"] <= step]
    write_text(folder / METRICS, "".join(json.dumps(r) + "\n" for r in rows))
