"""What `--help` and start-up show: every option's default or where it comes from, no value type
after a switch, the choices a command accepts, the version, and no heavy import before parsing."""

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

import pi_lora
from pi_lora import rope
from pi_lora.cli import app

RUNNER = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["", "train", "plan", "merge", "export", "eval", "models", "recipes", "recipes show", "recipes validate"]


def pi_lora_cli(*args, importtime=False):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERMINAL_WIDTH": "1000", "COLUMNS": "1000"}
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", "pi_lora", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def option_rows(command: str) -> dict[str, str]:
    """Each option's row of the help table, one line each at this width, by its first name."""
    result = pi_lora_cli(*command.split(), "--help")
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        m = re.match(r"│ (--[\w-]+)", line)
        if m:
            rows[m.group(1)] = " ".join(line.strip("│ ").split())
    assert rows, result.stdout
    return rows


def switches(command: str) -> set[str]:
    """The on/off options that are off unless given (a bare --flag), from the command itself."""
    group = typer.main.get_command(app)
    node = group
    for part in command.split():
        node = node.commands[part]
    return {p.opts[0] for p in node.params if getattr(p, "is_flag", False) and not p.secondary_opts}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_shows_its_default_and_no_switch_a_value_type(command):
    rows = option_rows(command)
    for name, row in rows.items():
        assert "<bool>" not in row, row
        if name in switches(command) or name in ("--help", "--version"):
            continue  # a bare switch is off unless given
        assert "[default:" in row or "[required]" in row, row


def test_train_offers_the_scalings_it_trains():
    row = option_rows("train")["--scaling"]
    offered = re.search(r"<([\w|]+)>", row).group(1).split("|")
    assert offered == list(rope.TRAINABLE)


def test_train_refuses_an_eval_only_scaling_before_loading(tmp_path, monkeypatch):
    from pi_lora import preflight

    monkeypatch.setattr(preflight, "prepare", lambda *a, **k: pytest.fail("a model was loaded"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {base: nowhere/none}\nrope: {target_len: 512, scaling: dynamic}\n")
    result = RUNNER.invoke(app, ["train", "--recipe", str(recipe), "--output", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "use it in pi-lora eval" in result.output and not (tmp_path / "run").exists()


def test_version():
    result = pi_lora_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"pi-lora {pi_lora.__version__}"


@pytest.mark.parametrize("command", ["train", "eval", "export", "merge", "plan"])
def test_help_imports_no_torch_transformers_or_datasets(command):
    result = pi_lora_cli(command, "--help", importtime=True)
    assert result.returncode == 0
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "typer" in imported  # the check sees imports at all
    assert not imported & {"torch", "transformers", "datasets"}


def test_help_is_quick():
    """CPU seconds, not wall time: on a shared machine the wall time measures the neighbours."""
    pi_lora_cli("--help")  # a warm file cache, as on a second look
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert pi_lora_cli("train", "--help").returncode == 0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime) < 0.8  # about 0.35 s
