import pytest
import yaml
from typer.testing import CliRunner

from pi_lora import recipe
from pi_lora.cli import app
from pi_lora.errors import PiLoraError, RecipeError


@pytest.mark.parametrize("name", sorted(recipe.shipped()))
def test_every_shipped_recipe_validates(name):
    path = recipe.shipped()[name]
    text = path.read_text()
    assert text.startswith("# "), "each shipped recipe states its budget and hardware in a comment"
    assert "Token budget" in text
    checked = recipe.validate(recipe.read(path), source=name)
    assert checked.model.base and checked.rope.target_len


def test_shipped_set_is_complete():
    assert {"demo", "llama-7b-16k", "llama-7b-32k", "llama2-13b-16k"} <= set(recipe.shipped())


def test_bad_recipe_lists_every_problem_with_key_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model:\n  base: llama-7b\n  quant: nf5\nrope:\n  target_len: '16384'\n"
        "lora:\n  rnak: 8\ntrain:\n  lr: fast\n  betas: [0.9]\nextra: 1\n"
    )
    with pytest.raises(RecipeError) as e:
        recipe.validate(recipe.read(bad))
    text = str(e.value)
    assert len(e.value.problems) == 6, text
    assert "model.quant:" in text and "'nf5'" in text
    assert "rope.target_len:" in text and "'16384'" in text
    assert "lora.rnak: unknown key (did you mean 'rank'?)" in text
    assert "train.lr:" in text and "train.betas:" in text
    assert "extra: unknown key" in text


def test_missing_required_keys_reported(tmp_path):
    with pytest.raises(RecipeError) as e:
        recipe.validate({"train": {"steps": 3}})
    assert {p.split(":")[0] for p in e.value.problems} == {"model.base", "rope.target_len"}


def test_yaml_exponent_floats_are_numbers():
    assert recipe.parse_value("2e-5") == pytest.approx(2e-5)
    assert recipe.parse_value("1.5") == 1.5
    assert recipe.parse_value("[embed, norm]") == ["embed", "norm"]


def test_precedence_defaults_recipe_set_flag():
    tree = {"model": {"base": "b"}, "rope": {"target_len": 100}, "train": {"lr": 1e-3, "steps": 5, "seed": 1}}
    resolved, overrides = recipe.resolve(
        tree, ["train.lr=2e-3", "train.steps=7"], {"train.steps": 9, "lora.rank": None}, source="r.yaml"
    )
    assert resolved.train.lr == 2e-3 and resolved.train.steps == 9 and resolved.train.seed == 1
    assert resolved.lora.rank == 8  # a flag left unset changes nothing
    assert overrides["train.lr"] == (2e-3, "--set")
    assert overrides["train.steps"] == (9, "flag")
    assert overrides["train.seed"] == (1, "r.yaml")
    assert "lora.rank" not in overrides
    assert resolved.output == "runs/b-100"


def test_set_errors():
    with pytest.raises(RecipeError, match="expected key.path=value"):
        recipe.parse_sets(["train.lr"])
    with pytest.raises(RecipeError, match="train.lrr: unknown key .did you mean 'lr'"):
        recipe.resolve({"model": {"base": "b"}, "rope": {"target_len": 9}}, ["train.lrr=1"], {})


def test_find_suggests_close_name():
    with pytest.raises(PiLoraError, match="Did you mean 'llama-7b-16k'"):
        recipe.find("llama-7b-16")
    assert recipe.find("demo").name == "demo.yaml"


def test_dump_round_trips():
    resolved, _ = recipe.resolve({"model": {"base": "x"}, "rope": {"target_len": 10}}, [], {})
    again = recipe.validate(yaml.safe_load(recipe.dump(resolved)))
    assert again == resolved


def test_cli_validate_exit_codes(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["recipes", "validate", "demo", "llama-7b-32k"])
    assert ok.exit_code == 0, ok.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stpes: 3\n")
    result = runner.invoke(app, ["recipes", "validate", str(bad)])
    assert result.exit_code == 2
    assert "train.stpes: unknown key (did you mean 'steps'?)" in result.output
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [\n")
    assert runner.invoke(app, ["recipes", "validate", str(broken)]).exit_code == 2


def test_cli_recipes_list_and_show():
    runner = CliRunner()
    listed = runner.invoke(app, ["recipes"])
    assert listed.exit_code == 0 and "llama2-13b-16k" in listed.output
    shown = runner.invoke(app, ["recipes", "show", "llama-7b-16k"])
    assert shown.exit_code == 0 and "target_len: 16384" in shown.output
    assert runner.invoke(app, ["recipes", "show", "nope"]).exit_code == 2
