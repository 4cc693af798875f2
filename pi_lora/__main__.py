"""`python -m pi_lora` and the `pi-lora` command.

Ctrl-C or SIGTERM while the libraries import (a second or more) ends in one line and exit 130, as it
does once a command runs."""

import signal
import sys


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main():
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        from .cli import main as cli

        cli()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted.\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
