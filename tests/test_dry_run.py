"""Seeing a run before it runs: `train --dry-run` and `recipes show --resolved` print the resolved recipe
and the plan, load no weight, write nothing; `--set` problems are blamed on --set; the plan gives one
figure, "needs", the same in its table, its verdict, train's start line and the recipes' comments."""

import re

import pytest
import yaml
from typer.testing import CliRunner

from pi_lora import recipe as recipes_mod
from pi_lora import preflight
from pi_lora.cli import app

RUNNER = CliRunner()


@pytest.fixture
def no_loading(monkeypatch, tmp_path):
    """Loading any weight fails the test; the home folder (demo base, token caches) starts empty."""
    monkeypatch.setenv("PI_LORA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(preflight, "prepare", lambda *a, **k: pytest.fail("weights were loaded"))
    from pi_lora import demo

    monkeypatch.setattr(demo, "build_tiny_llama", lambda *a, **k: pytest.fail("the demo base was built"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def resolved_yaml(output: str) -> dict:
    """The YAML between the 'resolved recipe' and 'plan' rules."""
    block = output.split("resolved recipe", 1)[1].split("\n", 1)[1]
    return yaml.safe_load(re.split(r"\n─+ plan ─+\n", block)[0])


def test_dry_run_of_a_recipe_prints_it_resolved_and_its_plan_and_writes_nothing(no_loading):
    result = RUNNER.invoke(app, ["train", "--recipe", "demo", "--set", "train.steps=5", "--dry-run"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    want, _ = recipes_mod.resolve(recipes_mod.read(recipes_mod.find("demo")), ["train.steps=5"], {})
    assert resolved_yaml(result.output) == want.model_dump(mode="json")
    assert "needs per device" in result.output and "fits: needs" in result.output
    assert sorted(p.name for p in no_loading.iterdir()) == []  # no run folder, no home, no cache


def test_dry_run_with_plain_flags(no_loading, tiny_base):
    result = RUNNER.invoke(app, ["train", "--base", str(tiny_base), "--target-len", "256", "--steps", "7", "--dry-run"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    got = resolved_yaml(result.output)
    assert (got["rope"]["target_len"], got["train"]["steps"], got["train"]["lr"]) == (256, 7, 2e-5)
    assert "64 -> 256 tokens" in " ".join(result.output.split())
    assert not list(no_loading.iterdir())


def test_dry_run_refuses_what_train_would_refuse(no_loading, tiny_base):
    result = RUNNER.invoke(app, ["train", "--base", str(tiny_base), "--target-len", "256", "--gpu-mem", "1MiB",
                                 "--dry-run"])
    assert result.exit_code == 2 and "this run needs" in result.output


def test_recipes_show_resolved(no_loading):
    result = RUNNER.invoke(app, ["recipes", "show", "llama-7b-16k", "--resolved"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    want, _ = recipes_mod.resolve(recipes_mod.read(recipes_mod.find("llama-7b-16k")), [], {})
    assert resolved_yaml(result.output) == want.model_dump(mode="json")
    assert "fits: needs" in result.output
    raw = RUNNER.invoke(app, ["recipes", "show", "llama-7b-16k"])
    assert raw.output == recipes_mod.find("llama-7b-16k").read_text()  # without --resolved: the file


def test_set_problems_name_set_not_the_recipe_file():
    with pytest.raises(recipes_mod.RecipeError) as found:
        recipes_mod.resolve(recipes_mod.read(recipes_mod.find("demo")), ["train.stpes=5"], {}, source="recipes/demo.yaml")
    assert str(found.value).startswith("--set: 1 problem(s)") and "--set train.stpes: unknown key" in str(found.value)
    tree = {**recipes_mod.read(recipes_mod.find("demo")), "lora": {"rnak": 4}}
    with pytest.raises(recipes_mod.RecipeError) as both:
        recipes_mod.resolve(tree, ["train.lr=x"], {}, source="my.yaml")
    text = str(both.value)
    assert text.startswith("my.yaml: 2 problem(s)") and "--set train.lr:" in text and "- lora.rnak: unknown key" in text


def plan_needs(*args) -> float:
    result = RUNNER.invoke(app, ["plan", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    row = re.search(r"needs per device\s*│\s*([\d.]+)", result.output)
    verdict = re.search(r"fits: needs ([\d.]+) of", result.output)
    assert "smaller phase" not in result.output and "peak (allocated)" not in result.output
    assert row.group(1) == verdict.group(1)  # one figure, the same in both
    return float(verdict.group(1))


@pytest.mark.parametrize("name", ["llama-7b-16k", "llama-7b-32k", "llama-7b-128k", "llama2-13b-16k",
                                  "llama-65b-16k-fsdp"])
def test_recipe_comments_quote_what_the_plan_needs(name):
    first = recipes_mod.find(name).read_text().splitlines()[0]
    quoted = re.search(r"needs (\d+\.\d\d) of (\d+) GiB", first)
    assert quoted, first
    extra = ["--processes", "2", "--gpu-mem", "48GiB"] if "fsdp" in name else ["--gpu-mem", f"{quoted.group(2)}GiB"]
    assert plan_needs("--recipe", name, *extra) == float(quoted.group(1))
    assert not first.rstrip().endswith(":") and "LoRA+" not in first  # the recipe list shows the first line
