"""Long work reports its progress when stdout is not a terminal: a plain line per task every so often
and when it finishes (what, how far, the rate); in a terminal the bar is drawn instead."""

import io
import re

from rich.console import Console
from typer.testing import CliRunner

from pi_lora import console as console_mod
from pi_lora.cli import app

RUNNER = CliRunner()
LINE = re.compile(r"^(?P<what>[\w ,]+): (?P<done>[\d,]+)/(?P<total>[\d,]+) \(\d+%\), [\d.,]+/s, \d+s")


def lines(text: str) -> list[re.Match]:
    return [m for m in map(LINE.match, text.splitlines()) if m]


def test_plain_lines_when_not_a_terminal(monkeypatch):
    monkeypatch.setattr(console_mod, "PLAIN_EVERY", 0.0)
    out = io.StringIO()
    with console_mod.progress_bar(Console(file=out, width=100)) as bar:
        task = bar.add_task("perplexity", total=3, info="")
        quiet = bar.add_task("train", total=3, info="", own_lines=True)
        for _ in range(3):
            bar.advance(task)
            bar.advance(quiet)
    found = lines(out.getvalue())
    assert [(m["what"], m["done"], m["total"]) for m in found] == [("perplexity", str(i), "3") for i in (1, 2, 3)]
    assert out.getvalue().splitlines()[-1].endswith("(done)")


def test_a_line_every_so_often_not_every_step(monkeypatch):
    monkeypatch.setattr(console_mod, "PLAIN_EVERY", 3600.0)
    out = io.StringIO()
    with console_mod.progress_bar(Console(file=out, width=100)) as bar:
        task = bar.add_task("tokenizing", total=50, info="")
        for _ in range(50):
            bar.advance(task)
    assert [m["done"] for m in lines(out.getvalue())] == ["50"]  # only the finished line within the hour


def test_none_in_a_terminal(monkeypatch):
    monkeypatch.setattr(console_mod, "PLAIN_EVERY", 0.0)
    out = io.StringIO()
    with console_mod.progress_bar(Console(file=out, width=100, force_terminal=True)) as bar:
        task = bar.add_task("perplexity", total=3, info="")
        for _ in range(3):
            bar.advance(task)
    assert not lines(out.getvalue())


def test_piped_eval_and_export_report_progress(tiny_base, corpus, tmp_path, monkeypatch):
    """Through the commands, as under nohup: CliRunner's output is not a terminal."""
    monkeypatch.setattr(console_mod, "PLAIN_EVERY", 0.0)
    result = RUNNER.invoke(app, ["eval", str(tiny_base), "--lengths", "64,192", "--stride", "64", "--windows", "2",
                                 "--passkey-lengths", "192", "--distances", "2", "--trials", "1", "--no-passkey-check",
                                 "--data", str(corpus),
                                 "--output", str(tmp_path / "e")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    seen = {m["what"] for m in lines(result.output)}
    assert {"perplexity", "passkey 192"} <= seen, result.output
    run = tmp_path / "run"
    trained = RUNNER.invoke(app, ["train", "--base", str(tiny_base), "--target-len", "128", "--data", str(corpus),
                                  "--output", str(run), "--steps", "1", "--grad-accum", "1"], catch_exceptions=False)
    assert trained.exit_code == 0, trained.output
    assert not any(m["what"] == "train" for m in lines(trained.output))  # training logs its own steps
    assert "step 1/1" in trained.output
    exported = RUNNER.invoke(app, ["export", str(run), "--format", "gguf", "--no-verify"], catch_exceptions=False)
    assert exported.exit_code == 0, exported.output
    assert {"merging", "writing gguf"} <= {m["what"] for m in lines(exported.output)}, exported.output
