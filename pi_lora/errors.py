"""Errors a user can act on. The CLI prints their message and exits with their code:
2 bad input, 3 out of memory, 130 interrupted (Ctrl-C or SIGTERM). 1 is left to crashes (a bug)."""


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
