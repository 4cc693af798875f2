"""The shipped CPU demo recipe, end to end through the CLI, against golden losses (torchtune-style)."""

import json

import pytest
from typer.testing import CliRunner

from pi_lora import run
from pi_lora.cli import app

# Measured on this project's CI machine kind (2-core x86_64, torch 2.13.0 CPU). The demo base is
# built deterministically (seeded init and pretraining), so a drift here means the numerics changed.
GOLDEN = {1: 3.6261, 5: 3.5532, 10: 3.4299, 15: 3.4928, 20: 3.3632, 25: 3.1230, 30: 3.2720}
# validation loss on the held-out tenth of the text, at 1024 tokens
GOLDEN_VAL = {10: 3.3667, 20: 3.2279, 30: 3.1282}


@pytest.mark.slow
def test_demo_recipe_trains_saves_and_matches_golden_losses(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["train", "--recipe", "demo", "--output", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "PI: 256 -> 1024 tokens" in result.output
    for name in (run.RECIPE, run.META, run.METRICS, "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / run.META).read_text())["factor"] == 4.0
    rows = {r["step"]: r["loss"] for r in run.read_metrics(out)}
    assert len(rows) == 30
    for step, loss in GOLDEN.items():
        assert rows[step] == pytest.approx(loss, abs=2e-3), (step, rows[step])
    val = {r["step"]: r["val_loss"] for r in run.read_metrics(out) if "val_loss" in r}
    assert val == pytest.approx(GOLDEN_VAL, abs=2e-3)
    assert val[30] < val[10] - 0.15  # the held-out text improves, not only the training text
    first, last = sum(rows[s] for s in range(1, 6)) / 5, sum(rows[s] for s in range(26, 31)) / 5
    assert last < first - 0.15
