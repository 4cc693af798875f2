"""The memory plan: its breakdown against a hand computation, settings it picks, and refusals."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pi_lora import model, plan
from pi_lora.cli import app
from pi_lora.errors import PiLoraError
from pi_lora.recipe import Recipe

RUNNER = CliRunner()
GiB = 2**30


def llama7b() -> plan.Shape:
    return plan.Shape.of(model.plan_config("llama-7b"))


def test_breakdown_of_llama_7b_at_16k_matches_a_hand_computation():
    T, h, m, V, n = 16384, 4096, 11008, 32000, 32
    e = plan.estimate(llama7b(), plan.Settings(target_len=T), cuda=True)
    linears = n * (4 * h * h + 3 * h * m)  # q, k, v, o and gate, up, down; no GQA in LLaMA-1
    nf4 = 0.5 + 1 / 64 + 4 / (64 * 256)  # codes, 8-bit block scales, fp32 scale per 256 blocks
    hand = {
        "base weights (linears)": linears * nf4,
        "base weights (embeddings, head, norms)": (2 * V * h + (2 * n + 1) * h) * 4,  # fp32 after k-bit prep
        "LoRA weights, gradients, AdamW": n * 4 * 8 * (h + h) * 16,
        "checkpointed layer inputs": n * T * h * 4,  # exactly 8 GiB: the fp32 residual stream per layer
        "one layer's recompute + backward": T * h * (6 * 4 + 10 * 2) + T * m * 2 * 6,
        "LM head + loss": 4096 * V * (12 + 2) + 2 * T * h * 4,
    }
    assert e.parts == pytest.approx(hand)
    assert hand["checkpointed layer inputs"] == 8 * GiB
    static = sum(v for k, v in hand.items() if k not in ("one layer's recompute + backward", "LM head + loss"))
    assert e.peak == pytest.approx(static + hand["one layer's recompute + backward"])
    assert e.needs == pytest.approx(e.peak * 1.05 + 0.8 * GiB)


def test_techniques_remove_what_they_should():
    shape, base = llama7b(), plan.Settings(target_len=32768)
    plain = plan.estimate(shape, base)
    unchunked = plan.estimate(shape, plan.Settings(target_len=32768, loss_chunk=0))
    assert unchunked.parts["LM head + loss"] == pytest.approx(32768 * 32000 * 14 + 2 * 32768 * 4096 * 4)
    tiled = plan.estimate(shape, plan.Settings(target_len=32768, mlp_tile=4096))
    saved = plain.parts["one layer's recompute + backward"] - tiled.parts["one layer's recompute + backward"]
    assert saved == pytest.approx((32768 - 4096) * 11008 * 2 * 6)
    offloaded = plan.estimate(shape, plan.Settings(target_len=32768, offload_activations=True))
    assert offloaded.parts["checkpointed layer inputs"] == 0
    assert offloaded.offloaded == 32 * 32768 * 4096 * 4
    assert plain.peak - offloaded.peak == pytest.approx(16 * GiB)


def test_fit_picks_the_cheapest_settings_that_fit():
    shape, s = llama7b(), plan.Settings(target_len=32768)
    auto = {"mlp_tile", "offload_activations"}
    roomy, changes = plan.fit(shape, s, 80 * GiB, cuda=True, auto=auto)
    assert changes == {} and roomy.needs <= 80 * GiB
    tight, changes = plan.fit(shape, s, 24 * GiB, cuda=True, auto=auto)
    assert changes == {"offload_activations": True} and tight.needs <= 24 * GiB
    # nothing may change that the recipe fixed: the smallest estimate is returned, and it does not fit
    fixed, changes = plan.fit(shape, s, 24 * GiB, cuda=True, auto=set())
    assert changes == {} and fixed.needs > 24 * GiB
    # on a CPU, activations are in host memory already: offload is never picked
    _, changes = plan.fit(shape, s, 20 * GiB, cuda=False, auto=auto)
    assert "offload_activations" not in changes


def test_max_length_is_the_boundary_of_fit():
    shape, s = llama7b(), plan.Settings(target_len=2048)
    longest = plan.max_length(shape, s, 24 * GiB, True, set(), step=1024)
    assert plan.estimate(shape, plan.Settings(target_len=longest)).needs <= 24 * GiB
    assert plan.estimate(shape, plan.Settings(target_len=longest + 1024)).needs > 24 * GiB


def test_two_gpus_hold_half_the_layers_each():
    shape = llama7b()
    one = plan.estimate(shape, plan.Settings(target_len=32768))
    two = plan.estimate(shape, plan.Settings(target_len=32768, gpus=2))
    half = (one.parts["base weights (linears)"] + one.parts["checkpointed layer inputs"]) / 2
    assert two.peak == pytest.approx(half + one.parts["LoRA weights, gradients, AdamW"]
                                     + one.parts["one layer's recompute + backward"])
    assert two.peak < one.peak - 8 * GiB


@pytest.mark.parametrize("text,expected", [("24GiB", 24 * GiB), ("24GB", 24 * GiB), ("80 G", 80 * GiB),
                                           ("512MiB", 512 * 2**20), ("1.5GiB", 1.5 * GiB), ("1000", 1000)])
def test_parse_size(text, expected):
    assert plan.parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1GiB", "0GiB", "24 PB", ""])
def test_parse_size_rejects(text):
    with pytest.raises(PiLoraError, match="not like"):
        plan.parse_size(text)


def test_every_alias_has_a_shipped_config_with_its_shape():
    for alias in model.ALIASES:
        shape = plan.Shape.of(model.plan_config(alias))
        assert shape.hidden % shape.heads == 0 and shape.layers > 0, alias
    llama3 = plan.Shape.of(model.plan_config("llama3-8b"))
    assert (llama3.vocab, llama3.kv_heads, llama3.intermediate) == (128256, 8, 14336)
    assert model.plan_config("llama3-8b").max_position_embeddings == 8192
    assert plan.Shape.of(model.plan_config("smollm2-135m")).tied


def test_shipped_recipes_fit_the_gpus_their_comments_promise():
    from pi_lora import recipe as recipes

    for name, path in recipes.shipped().items():
        if name == "demo":
            continue
        r = recipes.validate(recipes.read(path))
        d = plan.decide(plan.Shape.of(model.plan_config(r.model.base)), r, 2, cuda=True, budget=24 * GiB)
        assert d.fits, f"{name}: {plan.refusal(d, d.estimate.shape, plan.auto_keys(r.train))}"


def test_plan_command_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = RUNNER.invoke(app, ["plan", "--base", "llama-7b", "--target-len", "32768", "--gpu-mem", "24GiB"])
    assert result.exit_code == 0, result.output
    assert "checkpointed layer inputs" in result.output and "fits" in result.output
    assert "offload_activations True (auto)" in result.output


def test_plan_command_refuses_with_the_reason():
    result = RUNNER.invoke(app, ["plan", "--base", "llama-7b", "--target-len", "32768", "--gpu-mem", "12GiB",
                                 "--set", "train.offload_activations=false", "--set", "train.mlp_tile=0"])
    assert result.exit_code == 2
    assert "needs 32.0 GiB per device and has 12.0 GiB" in result.output
    assert "checkpointed layer inputs 16.0 GiB" in result.output and "rope.target_len" in result.output


def test_plan_command_bad_input():
    result = RUNNER.invoke(app, ["plan", "--base", "llama-7b", "--target-len", "1024"])
    assert result.exit_code == 2 and "longer than" in result.output
    result = RUNNER.invoke(app, ["plan", "--base", "llama-7b", "--target-len", "16384", "--gpu-mem", "lots"])
    assert result.exit_code == 2 and "not like" in result.output
    result = RUNNER.invoke(app, ["plan", "--target-len", "16384"])
    assert result.exit_code == 2 and "model.base" in result.output


def test_train_refuses_a_run_the_plan_says_cannot_fit(tiny_base, corpus, tmp_path):
    out = tmp_path / "run"
    result = RUNNER.invoke(app, ["train", "--base", str(tiny_base), "--target-len", "256", "--data", str(corpus),
                                 "--output", str(out), "--steps", "1", "--gpu-mem", "1MiB"])
    assert result.exit_code == 2, result.output
    assert "needs" in result.output and "has 0.0 GiB" in result.output
    assert not out.exists()  # refused before anything was written


def test_train_resolves_auto_settings_into_the_saved_recipe(tiny_base, corpus, tmp_path):
    import yaml

    out = tmp_path / "run"
    result = RUNNER.invoke(app, ["train", "--base", str(tiny_base), "--target-len", "256", "--data", str(corpus),
                                 "--output", str(out), "--steps", "1", "--grad-accum", "1"])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "recipe.yaml").read_text())["train"]
    assert saved["mlp_tile"] == 0 and saved["offload_activations"] is False
    assert "planned peak" in result.output and "memory after the first step" in result.output
    assert json.loads((out / "pi_lora.json").read_text())["planned_peak_gib"] > 0
