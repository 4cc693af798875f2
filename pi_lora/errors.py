"""Errors a user can act on, and the one signal policy of every command.

The CLI prints their message and exits with their code: 2 bad input, 3 out of memory, 130 interrupted
(Ctrl-C or SIGTERM). 1 is left to crashes (a bug)."""


import contextlib
import signal
import sys
import threading


@contextlib.contextmanager
def interrupts():
    """One signal policy for every command: SIGTERM (a scheduler, `kill`) stops it as Ctrl-C does, so
    the same cleanup runs and the CLI says one line and exits 130."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outermost = signal.getsignal(signal.SIGINT) is not _interrupt  # a nested one keeps a signal seen
    if outermost:
        _signalled.clear()
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    hook = sys.unraisablehook
    if outermost:
        sys.unraisablehook = _quiet_about_the_signal(hook)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if outermost:
            sys.unraisablehook = hook
            _signalled.clear()


def _quiet_about_the_signal(hook):
    """Python prints a traceback ("Exception ignored in ...") for the KeyboardInterrupt a signal raised
    inside a __del__. It is not lost (stop_if_interrupted raises it again), so the user is spared that
    traceback; anything else still goes to the hook as before."""
    def quiet(unraisable):
        if not (unraisable.exc_type is KeyboardInterrupt and _signalled.is_set()):
            hook(unraisable)
    return quiet


_signalled = threading.Event()


def _interrupt(signum, frame):
    _signalled.set()
    raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether Ctrl-C or SIGTERM stopped the command, also where a library turned the KeyboardInterrupt
    into an error of its own (safetensors' get_tensor raises a ValueError about UntypedStorage)."""
    return _signalled.is_set()


def stop_if_interrupted() -> None:
    """Raise the KeyboardInterrupt a signal raised where something swallowed it: Python ignores an
    exception raised in a __del__ ("Exception ignored in ..."), and the command would go on to finish
    and replace what the user asked to keep. Called before anything is put in place."""
    if _signalled.is_set() and not _saving.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def saving_after_interrupt():
    """The writes of code that caught the interruption and saves what was done on purpose (train's
    last whole step): stop_if_interrupted lets them through."""
    _saving.set()
    try:
        yield
    finally:
        _saving.clear()


_saving = threading.Event()


def first_line(error: BaseException) -> str:
    """A library error's first line: enough to act on, without its traceback."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class PiLoraError(Exception):
    """Bad input: a missing file, an impossible length, a model we cannot extend."""

    exit_code = 2


class RecipeError(PiLoraError):
    """A recipe with one or more problems; all of them are listed, each with its key path."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


class OutOfMemory(PiLoraError):
    """The accelerator ran out of memory; the message says what to change."""

    exit_code = 3


class Interrupted(PiLoraError):
    """Ctrl-C or SIGTERM: the message says what was kept."""

    exit_code = 130


def read_text(path, what: str = "file") -> str:
    """The one reader of text a user gives (recipes, data files): UTF-8, else one line naming the file
    and the byte, never a traceback."""
    from pathlib import Path

    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise PiLoraError(f"{what} '{path}' is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                          f"{e.start:,}); save it as UTF-8.") from None
    except FileNotFoundError:
        raise PiLoraError(f"{what} '{path}' does not exist.") from None
    except OSError as e:
        raise PiLoraError(f"cannot read {what} '{path}': {e.strerror}.") from None


def check_text(path, what: str = "data file") -> None:
    """What `read_text` checks, for a file too large to hold: UTF-8 throughout, else the same one line."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    raise PiLoraError(f"{what} '{path}' is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                                      f"{offset + e.start:,}); save it as UTF-8.") from None
                offset += len(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise PiLoraError(f"{what} '{path}' is not UTF-8 text (it ends inside a character); save it as UTF-8.") from None
    except OSError as e:
        raise PiLoraError(f"cannot read {what} '{path}': {e.strerror}.") from None
