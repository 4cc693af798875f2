"""The terminal: the progress display (drawn, or plain lines off a terminal), tables, one-line messages."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from .errors import stop_if_interrupted

ERROR = "[bold red]error:[/]"  # how every command begins the one line that says why it stopped


def say(console: Console, message: str) -> None:
    """One message as written: numbers and paths not highlighted, long lines not broken (a log keeps
    it whole, a terminal wraps it itself)."""
    console.print(message, highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """A note on stderr (stdout may be a pipe of results)."""
    say(Console(stderr=True), message)


def table(*columns: str, title: str | None = None) -> Table:
    """A table of the commands' own (settings, aliases, recipes), its title on the left."""
    return Table(*columns, title=title, title_justify="left")


class InfoColumn(ProgressColumn):
    """A task's `info` field (the training loop's loss line); tasks without one show nothing."""

    def render(self, task) -> Text:
        return Text(str(task.fields.get("info", "")))


PLAIN_EVERY = 30.0  # seconds between the plain progress lines of a task when stdout is not a terminal


class LoggedProgress(Progress):
    """A progress bar that, where it is not drawn (stdout is a file, a pipe, a scheduler's log), prints a
    plain line per task every PLAIN_EVERY seconds and when it finishes: what, how far, the rate. rich
    has no such mode. A task added with `own_lines=True` (training, which logs its steps) prints none."""

    def add_task(self, description, *args, own_lines: bool = False, **kwargs):
        task_id = super().add_task(description, *args, **kwargs)
        self._lines = {**getattr(self, "_lines", {}), task_id: None if own_lines else time.monotonic()}
        return task_id

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._say(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        stop_if_interrupted()  # a signal a __del__ swallowed stops the work now, not at its end
        super().advance(task_id, advance)
        self._say(task_id)

    def _say(self, task_id) -> None:
        said = self._lines.get(task_id)
        if not self.disable or said is None:
            return
        task = self._tasks[task_id]
        done = task.total is not None and task.completed >= task.total
        if not done and time.monotonic() - said < PLAIN_EVERY:
            return
        self._lines[task_id] = None if done else time.monotonic()  # the finished line is the last
        self.console.print(plain_line(task, done), highlight=False, soft_wrap=True)


def plain_line(task, done: bool) -> str:
    """`perplexity: 12/40 (30%), 1.3/s, 9s, about 21s left  info`: one task's progress as text."""
    elapsed = task.elapsed or 0.0
    rate = task.completed / elapsed if elapsed > 0 else 0.0
    far = f"{task.completed:,.0f}/{task.total:,.0f} ({task.percentage:.0f}%)" if task.total else f"{task.completed:,.0f}"
    line = f"{task.description}: {far}, {rate:,.2f}/s, {elapsed:,.0f}s"
    if done:
        line += " (done)"
    elif rate > 0 and task.total:
        line += f", about {(task.total - task.completed) / rate:,.0f}s left"
    info = str(task.fields.get("info", "")).strip()
    return f"{line}  {info}" if info else line


def progress_bar(console: Console) -> Progress:
    """The one progress display of every command: drawn in a terminal, plain lines elsewhere."""
    return LoggedProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        InfoColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )
