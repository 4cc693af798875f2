"""`python -m pi_lora` and the `pi-lora` command.

Ctrl-C or SIGTERM while the libraries import (a second or more) ends in one line and exit 130, as it
does once a command runs."""

import os
import signal
import sys

from .errors import Interrupted  # light: no library behind it

INTERRUPTED = Interrupted.exit_code


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main():
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        from .cli import main as cli

        cli()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted.\n")
        leave(INTERRUPTED)
    except SystemExit as e:
        if e.code == INTERRUPTED:
            if isinstance(getattr(e.__context__, "__cause__", None), KeyboardInterrupt):
                sys.stderr.write("interrupted.\n")  # typer's own Exit(130), silent: the signal came as it parsed
            leave(INTERRUPTED)
        for sig in (signal.SIGINT, signal.SIGTERM):  # the command has ended: a late Ctrl-C changes nothing
            signal.signal(sig, signal.SIG_IGN)
        raise


def leave(code: int) -> None:
    """Exit with `code` now. Every cleanup of the command has run; what is skipped is CPython's
    finalization, which (3.11) kills the process with SIGINT, exit -2, after a Ctrl-C that was handled,
    when the KeyboardInterrupt had been raised inside code run by exec() of a string, as dataclasses
    does for every class it makes while the libraries import."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
