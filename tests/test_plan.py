"""The memory plan: its breakdown against a hand computation, settings it picks, and refusals."""

import json

import pytest
from typer.testing import CliRunner

from pi_lora import model, plan
from pi_lora.cli import app
from pi_lora.errors import PiLoraError

RUNNER = CliRunner()
GiB = 2**30


def llama7b() -> plan.Shape:
    return plan.Shape.of(model.plan_config("llama-7b"))


def test_breakdown_of_llama_7b_at_16k_matches_a_hand_computation():
    T, h, m, V, n = 16384, 4096, 11008, 32000, 32
    e = plan.estimate(llama7b(), plan.Settings(train_len=T), cuda=True)
    linears = n * (4 * h * h + 3 * h * m)  # q, k, v, o and gate, up, down; no GQA in LLaMA-1
    nf4 = 0.5 + 1 / 64 + 4 / (64 * 256)  # codes, 8-bit block scales, fp32 scale per 256 blocks
    hand = {
        "base weights (linears)": linears * nf4,
        "base weights (embeddings, head, norms)": 2 * V * h * 2 + (2 * n + 1) * h * 4,  # frozen: bf16; norms fp32
        "LoRA weights, gradients, AdamW": n * 4 * 8 * (h + h) * 16,
        "checkpointed layer inputs": n * T * h * 2,  # exactly 4 GiB: the bf16 residual stream per layer
        # what the attention block saves (fp32 norm internals, bf16 hidden-size vectors, copies of k and
        # v), the MLP's backward (larger here than the attention block's), a dequantized weight
        "one layer's recompute + backward": T * h * (4.2 * 4 + 3.3 * 2) + T * 2 * 1.65 * 2 * h + T * m * 8.4 + h * m * 2,
        "LM head + loss": 4096 * V * 12 + T * h * (8 + 2 * 2),
    }
    assert e.parts == pytest.approx(hand)
    assert hand["checkpointed layer inputs"] == 4 * GiB
    static = sum(v for k, v in hand.items() if k not in ("one layer's recompute + backward", "LM head + loss"))
    assert e.peak == pytest.approx(static + hand["one layer's recompute + backward"])
    assert e.needs == pytest.approx(e.peak * 1.05 + 0.8 * GiB)


def test_techniques_remove_what_they_should():
    shape, base = llama7b(), plan.Settings(train_len=32768)
    plain = plan.estimate(shape, base)
    unchunked = plan.estimate(shape, plan.Settings(train_len=32768, loss_chunk=0))
    assert unchunked.parts["LM head + loss"] == pytest.approx(32768 * 32000 * 12 + 32768 * 4096 * 12)
    tiled = plan.estimate(shape, plan.Settings(train_len=32768, mlp_tile=4096))
    saved = plain.parts["one layer's recompute + backward"] - tiled.parts["one layer's recompute + backward"]
    # with the MLP tiled, the attention block's backward (gradients of k and v) is the larger phase
    assert saved == pytest.approx(32768 * 11008 * 8.4 - max(4096 * 11008 * 8.4, 32768 * 2 * 2.35 * 2 * 4096))
    offloaded = plan.estimate(shape, plan.Settings(train_len=32768, offload_activations=True))
    assert offloaded.parts["checkpointed layer inputs"] == 0
    assert offloaded.offloaded == 32 * 32768 * 4096 * 2
    # all 32 layer inputs leave the device; the one being recomputed comes back
    assert plain.peak - offloaded.peak == pytest.approx(8 * GiB - 32768 * 4096 * 2)


def test_fit_picks_the_fastest_settings_that_fit():
    shape, s = llama7b(), plan.Settings(train_len=32768)
    auto = {"mlp_tile", "offload_activations"}
    roomy, changes = plan.fit(shape, s, 80 * GiB, cuda=True, auto=auto)
    assert changes == {} and roomy.needs <= 80 * GiB
    tight, changes = plan.fit(shape, s, 16 * GiB, cuda=True, auto=auto)
    assert changes == {"offload_activations": True} and tight.needs <= 16 * GiB
    tighter, changes = plan.fit(shape, plan.Settings(train_len=65536), 18 * GiB, cuda=True, auto=auto)
    assert changes == {"mlp_tile": 4096, "offload_activations": True} and tighter.needs <= 18 * GiB
    # nothing may change that the recipe fixed: the smallest estimate is returned, and it does not fit
    fixed, changes = plan.fit(shape, s, 16 * GiB, cuda=True, auto=set())
    assert changes == {} and fixed.needs > 16 * GiB
    # on a CPU, activations are in host memory already: offload is never picked
    _, changes = plan.fit(shape, s, 20 * GiB, cuda=False, auto=auto)
    assert "offload_activations" not in changes


AUTO = {"gradient_checkpointing", "mlp_tile", "attention_tile", "offload_activations"}


def test_with_room_to_spare_fewer_layers_are_checkpointed():
    shape = llama7b()
    roomy, changes = plan.fit(shape, plan.Settings(train_len=8192), 80 * GiB, cuda=True, auto=AUTO)
    assert changes == {"gradient_checkpointing": 0} and roomy.needs <= 80 * GiB  # no recompute at all
    s = plan.Settings(train_len=16384)
    counts = []
    for gib in (64, 40, 24):
        e, changes = plan.fit(shape, s, gib * GiB, cuda=True, auto=AUTO)
        n = changes["gradient_checkpointing"]
        assert set(changes) == {"gradient_checkpointing"}  # no tiling, no offload
        assert e.needs <= gib * GiB  # and with one layer fewer checkpointed it would not fit
        assert plan.estimate(shape, plan.Settings(train_len=16384, gradient_checkpointing=n - 1)).needs > gib * GiB
        counts.append(n)
    assert 0 < counts[0] < counts[1] < counts[2] < 32
    # each un-checkpointed layer keeps what its forward saved; the last one's is live during the head
    full = plan.estimate(shape, s)
    kept = plan.estimate(shape, plan.Settings(train_len=16384, gradient_checkpointing=30))
    saved = (full.parts["one layer's recompute + backward"] - 4096 * 11008 * 2) * plan.SAVED_FRACTION
    assert kept.parts["kept by 1 more un-checkpointed layers"] == pytest.approx(saved)
    assert kept.parts["LM head + loss"] == pytest.approx(full.parts["LM head + loss"] + saved)


def test_the_cost_model_orders_the_techniques():
    shape, s = llama7b(), plan.Settings(train_len=32768)
    cost = lambda **k: plan.cost(shape, plan.Settings(train_len=32768, **k))  # noqa: E731
    assert cost(gradient_checkpointing=0) < cost(gradient_checkpointing=16) < cost()
    assert cost() < cost(attention_tile=4096) < cost(mlp_tile=4096)  # projections are cheaper than the MLP
    assert cost(offload_activations=True) < cost(gradient_checkpointing=True, mlp_tile=4096, offload_activations=True)
    assert cost(attention_tile=40000) == cost()  # a tile as long as the sequence is no tiling
    e, changes = plan.fit(shape, s, 16 * GiB, cuda=True, auto=AUTO)
    assert changes.get("offload_activations") and plan.checkpointed(shape, e.settings) == 32  # offloads only checkpoints


def test_attention_tile_leaves_q_k_v_and_the_attention_output_of_the_sequence():
    shape = plan.Shape.of(model.plan_config("llama3-8b"))
    T, tile, h, q, kv, m = 131072, 4096, 4096, 4096, 1024, 14336
    s = plan.Settings(train_len=T, mlp_tile=tile)
    plain = plan.estimate(shape, s).parts["one layer's recompute + backward"]
    tiled = plan.estimate(shape, plan.Settings(train_len=T, mlp_tile=tile, attention_tile=tile)).parts[
        "one layer's recompute + backward"]
    # per position, bf16: what the untiled attention block saves, what its backward adds
    saved = h * (4 * plan.ATTN_SAVED_FP32_H + 2 * plan.ATTN_SAVED_DT_H) + 2 * plan.ATTN_SAVED_KV * 2 * kv
    grad = 2 * plan.ATTN_GRAD_KV * 2 * kv
    whole = 2 * (plan.ATTN_WHOLE_H * h + plan.ATTN_WHOLE_QKV * (q + 2 * kv))
    mlp = tile * m * plan.LAYER_M_BYTES[2]
    assert plain - tiled == pytest.approx(T * saved + max(mlp, T * grad) - T * whole - max(mlp, tile * (saved + grad)))
    assert whole < saved  # what tiling is for


def test_128k_of_llama_7b_fits_24_gib_with_offload_and_both_tilings():
    s = plan.Settings(train_len=131072, mlp_tile=4096, attention_tile=4096, offload_activations=True)
    assert plan.estimate(llama7b(), s).needs < 24 * GiB
    untiled = plan.Settings(train_len=131072, mlp_tile=4096, offload_activations=True)
    assert plan.estimate(llama7b(), untiled).needs > 24 * GiB  # the attention tile is what makes it fit


def test_a_fixed_gradient_checkpointing_is_kept_and_checked():
    from pi_lora import recipe as recipes

    r = recipes.validate({"model": {"base": "llama-7b"}, "rope": {"target_len": 16384},
                          "train": {"gradient_checkpointing": 3}})
    d = plan.decide(llama7b(), r, 2, cuda=True, budget=80 * GiB)
    assert plan.checkpointed(d.estimate.shape, d.estimate.settings) == 3 and "gradient_checkpointing" not in d.chosen
    r.train.gradient_checkpointing = 33
    with pytest.raises(PiLoraError, match="gradient_checkpointing is 33 layers; the model has 32"):
        plan.decide(llama7b(), r, 2, cuda=True, budget=80 * GiB)


def test_max_length_is_the_boundary_of_fit():
    shape, s = llama7b(), plan.Settings(train_len=2048)
    longest = plan.max_length(shape, s, 24 * GiB, True, set(), step=1024)
    assert plan.estimate(shape, plan.Settings(train_len=longest)).needs <= 24 * GiB
    assert plan.estimate(shape, plan.Settings(train_len=longest + 1024)).needs > 24 * GiB


@pytest.mark.parametrize("gpus,trainable", [(2, ()), (2, ("embed", "norm")), (3, ()), (4, ("embed",))])
def test_split_balances_the_layers_across_gpus(gpus, trainable):
    shape = llama7b()
    one = plan.estimate(shape, plan.Settings(train_len=32768, trainable=trainable))
    s = plan.Settings(train_len=32768, trainable=trainable, gpus=gpus)
    several = plan.estimate(shape, s)
    counts = plan.split(shape, s, several.parts)
    assert len(counts) == gpus and sum(counts) == 32 and min(counts) > 0
    loads = plan.loads(shape, s, several.parts, counts)
    per_layer = (one.parts["base weights (linears)"] + one.parts["LoRA weights, gradients, AdamW"]
                 + one.parts["checkpointed layer inputs"]) / 32
    assert max(loads) - min(loads) <= per_layer + 1  # no layer could move to make the busiest lighter
    assert several.peak == max(loads)
    # every device holds one layer's working set; the layers' bytes are divided, not copied
    assert several.peak < one.peak and sum(loads) > one.peak
    if trainable:  # the first GPU holds the trained embedding copy, so it gets fewer layers
        assert counts[0] < counts[-1]


def test_layer_map_places_every_module():
    config = model.plan_config("llama-7b")
    mapping = model.layer_map(config, [13, 19])
    assert [mapping[f"model.layers.{i}"] for i in range(32)] == [0] * 13 + [1] * 19
    assert mapping["model.embed_tokens"] == 0 and mapping["lm_head"] == 1 and mapping["model.norm"] == 1
    tied = model.layer_map(model.plan_config("smollm2-135m"), [10, 20])
    assert tied["lm_head"] == 0  # a tied head lives with the embeddings
    with pytest.raises(PiLoraError, match="does not match"):
        model.layer_map(config, [10, 10])


def test_train_refuses_more_gpus_than_the_machine_has(tiny_base, corpus, tmp_path):
    result = RUNNER.invoke(app, ["train", "--base", str(tiny_base), "--target-len", "256", "--data", str(corpus),
                                 "--output", str(tmp_path / "run"), "--gpus", "2"])
    assert result.exit_code == 2 and "model.gpus is 2 but this machine has 0 GPU(s)" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,expected", [("24GiB", 24 * GiB), ("24GB", 24e9), ("80 G", 80 * GiB),
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

    promised = {"llama-65b-16k-fsdp": (2, 48)}  # processes, GiB per GPU; others: one 24 GB GPU
    for name, path in recipes.shipped().items():
        if name == "demo":
            continue
        r = recipes.validate(recipes.read(path))
        processes, gib = promised.get(name, (1, 24))
        assert r.model.shard == (processes > 1), name
        d = plan.decide(plan.Shape.of(model.plan_config(r.model.base)), r, 2, cuda=True, budget=gib * GiB,
                        processes=processes)
        assert d.fits, f"{name}: {plan.refusal(d, d.estimate.shape, plan.auto_keys(r.train))}"


def test_plan_command_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = RUNNER.invoke(app, ["plan", "--base", "llama-7b", "--target-len", "32768", "--gpu-mem", "16GiB"])
    assert result.exit_code == 0, result.output
    assert "checkpointed layer inputs" in result.output and "fits" in result.output
    assert "offload_activations true (auto:" in result.output and "gradient_checkpointing true," in result.output


def test_settings_are_printed_as_a_recipe_spells_them():
    shape = plan.Shape.of(model.plan_config("llama-7b"))
    values = {"gradient_checkpointing": 32, "mlp_tile": 0, "offload_activations": False}
    assert plan.spell(shape, values) == "gradient_checkpointing true, mlp_tile 0, offload_activations false"
    assert plan.spell(shape, {"gradient_checkpointing": 27}) == "gradient_checkpointing 27 (of 32 layers)"
    assert plan.spell(shape, {"gradient_checkpointing": 0}) == "gradient_checkpointing false"


def test_plan_command_refuses_with_the_reason():
    result = RUNNER.invoke(app, ["plan", "--base", "llama-7b", "--target-len", "32768", "--gpu-mem", "12GiB",
                                 "--set", "train.offload_activations=false", "--set", "train.mlp_tile=0",
                                 "--set", "train.attention_tile=0", "--set", "train.gradient_checkpointing=true"])
    assert result.exit_code == 2
    e = plan.estimate(llama7b(), plan.Settings(train_len=32768, trainable=("embed", "norm")))
    assert f"needs {e.needs / GiB:.1f} GiB per device and has 12.0 GiB" in result.output
    assert "checkpointed layer inputs 8.0 GiB" in result.output and "rope.target_len" in result.output


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


def test_train_resolves_auto_settings_and_records_them_beside_the_recipe(tiny_base, corpus, tmp_path):
    import yaml

    out = tmp_path / "run"
    result = RUNNER.invoke(app, ["train", "--base", str(tiny_base), "--target-len", "256", "--data", str(corpus),
                                 "--output", str(out), "--steps", "1", "--grad-accum", "1"])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "recipe.yaml").read_text())["train"]
    assert saved["mlp_tile"] == "auto" and saved["offload_activations"] == "auto"  # re-planned on another GPU
    resolved = json.loads((out / "pi_lora.json").read_text())["resolved"]
    # the tiny model fits with room to spare: nothing checkpointed, tiled or offloaded
    assert resolved == {"gradient_checkpointing": 0, "mlp_tile": 0, "attention_tile": 0, "offload_activations": False}
    assert "memory: needs " in result.output and "memory after the first step" in result.output
    assert json.loads((out / "pi_lora.json").read_text())["planned_peak_gib"] > 0


def test_sharding_divides_what_each_process_holds_and_adds_the_gathered_layers():
    shape, T = llama7b(), 16384
    one = plan.estimate(shape, plan.Settings(train_len=T, trainable=("embed", "norm")), cuda=True)
    two = plan.estimate(shape, plan.Settings(train_len=T, trainable=("embed", "norm"), shards=2), cuda=True)
    held = ["base weights (linears)", "base weights (embeddings, head, norms)", "LoRA weights, gradients, AdamW",
            "trained embed/norm copies, gradients, AdamW"]
    for name in held:
        assert two.parts[name] == pytest.approx(one.parts[name] / 2), name
    # two layers; bf16 embeddings and head; the trained fp32 embeddings copy and its gradient
    gathered = 2 * one.parts["base weights (linears)"] / 32 + 2 * 32000 * 4096 * 2 + 2 * 32000 * 4096 * 4
    assert two.parts["gathered by FSDP (2 layers, embeddings, head)"] == pytest.approx(gathered)
    assert two.peak == pytest.approx(one.peak - sum(one.parts[n] for n in held) / 2 + gathered)
    # every process first loads the whole base: 7B fits, so that is not the peak here
    assert two.loading == pytest.approx(one.parts["base weights (linears)"]
                                        + one.parts["base weights (embeddings, head, norms)"] + 2 * 32000 * 4096 * 4)
    assert two.loading < two.peak


def test_data_parallel_adds_the_first_steps_gradients_beside_the_buckets():
    shape, T = llama7b(), 16384
    for trainable in ((), ("embed", "norm")):
        one = plan.estimate(shape, plan.Settings(train_len=T, trainable=trainable), cuda=True)
        two = plan.estimate(shape, plan.Settings(train_len=T, trainable=trainable, replicas=2), cuda=True)
        lora = 32 * 8 * 4 * (4096 + 4096)  # q/k/v/o at rank 8: A and B of each
        extra = 32000 * 4096 + 65 * 4096 if trainable else 0
        # one fp32 gradient per trainable parameter: 32 MiB for q/k/v/o, +0.5 GiB with the embeddings
        assert two.parts["DDP first step: gradients beside their buckets"] == (lora + extra) * 4
        assert two.peak == pytest.approx(one.peak + (lora + extra) * 4)
    sharded = plan.Settings.of(plan_recipe(shard=True), 2, processes=2)
    assert (sharded.shards, sharded.replicas) == (2, 1)
    assert plan.Settings.of(plan_recipe(shard=False), 2, processes=2).replicas == 2


def plan_recipe(shard: bool):
    from pi_lora.recipe import Recipe

    return Recipe.model_validate({"model": {"base": "llama-7b", "shard": shard}, "rope": {"target_len": 16384}})


def test_a_sharded_base_must_still_load_whole_on_each_gpu():
    sharded = RUNNER.invoke(app, ["plan", "--base", "llama-65b", "--target-len", "16384", "--gpu-mem", "24GiB",
                                  "--shard", "--processes", "4"])
    assert sharded.exit_code == 2 and "loads the whole 4-bit base" in sharded.output, sharded.output
    alone = RUNNER.invoke(app, ["plan", "--base", "llama-65b", "--target-len", "16384", "--shard"])
    assert alone.exit_code == 2 and "--processes" in alone.output, alone.output
    both = RUNNER.invoke(app, ["plan", "--base", "llama-7b", "--target-len", "16384", "--gpus", "2", "--processes", "2"])
    assert both.exit_code == 2 and "one or the other" in both.output, both.output


def test_plan_cli_plans_a_sharded_65b_on_two_48gib_cards():
    # (with the attention block tiled, one 48 GiB card holds it alone)
    alone = RUNNER.invoke(app, ["plan", "--base", "llama-65b", "--target-len", "65536", "--gpu-mem", "48GiB",
                                "--set", "train.attention_tile=0"])
    sharded = RUNNER.invoke(app, ["plan", "--base", "llama-65b", "--target-len", "65536", "--gpu-mem", "48GiB",
                                  "--shard", "--processes", "2"])
    assert alone.exit_code == 2 and "--shard --processes 2" in alone.output, alone.output
    assert sharded.exit_code == 0 and "gathered by FSDP" in sharded.output, sharded.output


def test_an_old_recipe_with_model_gradient_checkpointing_names_the_new_key(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  base: llama-7b\n  gradient_checkpointing: true\nrope:\n  target_len: 16384\n")
    result = RUNNER.invoke(app, ["plan", "--recipe", str(old)])
    assert result.exit_code == 2
    assert "model.gradient_checkpointing: moved to train.gradient_checkpointing" in result.output


@pytest.mark.parametrize("value,ok", [("auto", True), (True, True), (False, True), (0, True), (7, True),
                                      (-1, False), ("some", False), (1.5, False)])
def test_gradient_checkpointing_values(value, ok):
    from pi_lora import recipe as recipes
    from pi_lora.errors import RecipeError

    tree = {"model": {"base": "x"}, "rope": {"target_len": 10}, "train": {"gradient_checkpointing": value}}
    if ok:
        assert recipes.validate(tree).train.gradient_checkpointing == value
    else:
        with pytest.raises(RecipeError, match="train.gradient_checkpointing"):
            recipes.validate(tree)
