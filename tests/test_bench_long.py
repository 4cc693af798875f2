"""bench/compare.py --suite long (bench/long_suite.py): recipe keys by name, the time box's order, the plan's
figures, unsloth's point."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path[:0] = [str(BENCH)]

import long_suite  # noqa: E402


def test_settings_go_to_their_recipe_keys():
    tree = long_suite.recipe_values({"loss_chunk": 4096, "mlp_tile": "auto", "gpu_mem": "24GiB",
                                  "gradient_checkpointing": "auto", "attention_tile": 1024})
    assert tree == {"train": {"loss_chunk": 4096, "mlp_tile": "auto", "gpu_mem": "24GiB",
                              "gradient_checkpointing": "auto", "attention_tile": 1024}}
    from pi_lora.recipe import Recipe

    Recipe.model_validate({"model": {"base": "x"}, "rope": {"target_len": 1024}, **tree})  # every key exists


def test_the_plan_resolves_auto_for_the_budget():
    tree = long_suite.recipe_values(long_suite.method_values("fastest-24", True, 4096, 4096))
    explicit, chosen, d = long_suite.resolve(long_suite.SHAPES["7b"], tree, 65536, cuda=True)
    assert d.fits and d.budget == 24 * 2**30
    assert "auto" not in json.dumps(explicit)  # the point computes with the plan's picks
    assert all(explicit["train"][k] == v for k, v in chosen.items())
    assert chosen["mlp_tile"] or chosen["offload_activations"]  # 64k of a 7B needs one of them in 24 GiB
    tree = long_suite.recipe_values(long_suite.method_values("fastest-80", True, 4096, 4096))
    assert long_suite.resolve(long_suite.SHAPES["7b"], tree, 16384, cuda=True)[1]["mlp_tile"] == 0  # nothing needed


def test_the_time_box_takes_the_targets_first():
    order = long_suite.priority(list(long_suite.LONG_LENGTHS))
    assert order[:3] == [("7b", "usual", 16384), ("7b", "fastest-24", 16384), ("7b", "lowest", 131072)]
    assert len(order) == len(set(order)) == 2 * 5 * 4
    short, long = (long_suite.estimate_seconds("7b", "lowest", n, 1, True) for n in (16384, 131072))
    assert long_suite.OVERHEAD["7b"] < short < long
    assert 55 < long - long_suite.OVERHEAD["7b"] < 85  # 128k with offload and tiles: about 70 s a step (H200)


def test_plan_figures_for_both_shapes():
    rows = long_suite.plan_figures()
    assert len(rows) == 2 + 2 * 2
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        l24, l80 = (int(c.replace(",", "")) for c in cells[2:4])
        assert 16384 < l24 < l80 and float(cells[4]) > 24


def test_unsloth_point_reports_why_it_cannot_run_here(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU: the point would run")
    out = subprocess.run([sys.executable, str(BENCH / "unsloth_point.py"), json.dumps({"base": str(tmp_path), "length": 8})],
                         capture_output=True, text=True, timeout=120)
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record == {"status": "unavailable", "error": "unsloth's QLoRA needs a CUDA GPU"}


def test_a_tokenizer_of_the_base_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    long_suite.write_tokenizer(tmp_path, 300)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 300 and tok.convert_tokens_to_ids("t299") == 299
