"""`pi-lora merge` against peft's own merge, reloading, rope settings, and bad input."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from pi_lora import merge as merge_mod
from pi_lora import run
from pi_lora.cli import app
from pi_lora.errors import PiLoraError

RUNNER = CliRunner()


@pytest.fixture(scope="module")
def trained(tiny_base, corpus, tmp_path_factory):
    """A short run with LoRA on every linear layer plus trained embeddings and norms."""
    out = tmp_path_factory.mktemp("merge") / "run"
    argv = ["train", "--base", str(tiny_base), "--target-len", "256", "--data", str(corpus), "--output", str(out),
            "--steps", "3", "--lr", "1e-2", "--grad-accum", "1", "--rank", "4",
            "--set", "lora.trainable=[embed, norm]", "--set", "lora.target_modules=all-linear",
            "--set", "train.warmup_steps=0"]
    result = RUNNER.invoke(app, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def peft_reference(tiny_base, run_dir):
    meta = run.read_meta(run_dir)
    config = AutoConfig.from_pretrained(tiny_base)
    config.rope_parameters = meta["rope_parameters"]
    base = AutoModelForCausalLM.from_pretrained(tiny_base, config=config, dtype=torch.float32)
    return PeftModel.from_pretrained(base, run_dir / "adapter").eval()


def test_merge_equals_peft_merge_and_unload(trained, tiny_base, tmp_path):
    out = tmp_path / "merged"
    result = RUNNER.invoke(app, ["merge", str(trained), "--output", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "verified: merged logits match base + adapter (max relative difference" in result.output
    want = peft_reference(tiny_base, trained).merge_and_unload().state_dict()
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert set(got) == set(want)
    base = AutoModelForCausalLM.from_pretrained(tiny_base).state_dict()
    changed = [k for k in want if not torch.equal(want[k], base[k])]
    assert any("embed_tokens" in k for k in changed) and any("norm" in k for k in changed)
    assert any("mlp.down_proj" in k for k in changed)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)


def test_merged_folder_reloads_with_rope_and_matches_beyond_original_length(trained, tiny_base, tmp_path):
    out = tmp_path / "merged"
    merge_mod.merge(trained, out, check=False)
    config = json.loads((out / "config.json").read_text())
    # the default scaling: YaRN, which needs its original length to load
    assert config["rope_parameters"] == {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                         "original_max_position_embeddings": 64}
    assert config["rope_scaling"]["type"] == "yarn" and config["rope_scaling"]["factor"] == 4.0
    assert config["max_position_embeddings"] == 256
    assert (out / "tokenizer.json").is_file() and "factor 4" in (out / "README.md").read_text()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.config.rope_parameters["rope_theta"] == 10000.0
    ids = torch.randint(0, 500, (1, 200), generator=torch.Generator().manual_seed(1))  # past L = 64
    with torch.no_grad():
        want = peft_reference(tiny_base, trained)(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_merge_into_dequantized_matches_the_4bit_training_model(trained, tmp_path):
    out = tmp_path / "deq"
    checked = merge_mod.merge(trained, out, into="dequantized")  # verifies against NF4 base + adapter
    assert checked.status == "checked" and checked.error < 1e-4
    full = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert json.loads((out / run.META).read_text())["merged_into"] == "dequantized"
    assert full  # loads


def test_verification_is_a_status_with_its_reason(trained, tmp_path, monkeypatch):
    """Checked (with the difference), skipped on --no-verify, skipped when two fp32 copies do not fit:
    each said so by merge and export, never a number standing for "not checked"."""
    from pi_lora import export

    result = RUNNER.invoke(app, ["merge", str(trained), "--output", str(tmp_path / "n"), "--no-verify"])
    assert result.exit_code == 0 and "logits not verified: --no-verify was given" in result.output, result.output
    assert merge_mod.merge(trained, tmp_path / "n2", check=False) == merge_mod.Verification("skipped", "--no-verify was given")
    monkeypatch.setattr(merge_mod, "fits_twice", lambda source: False)
    result = RUNNER.invoke(app, ["merge", str(trained), "--output", str(tmp_path / "big")])
    assert result.exit_code == 0, result.output
    assert "logits not verified: two fp32 copies of this model do not fit" in " ".join(result.output.split())
    assert (tmp_path / "big" / "config.json").is_file()  # written all the same
    result = RUNNER.invoke(app, ["export", str(trained), "--format", "gguf", "--dtype", "fp32", "--tokenizer-pre",
                                 "gpt-2", "--output", str(tmp_path / "big.gguf")])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "verified: transformers reads the GGUF's tokenizer (pre-tokenizer 'gpt-2')" in said
    assert "logits not verified: two fp32 copies" in said
    checked = export.export_gguf(trained, tmp_path / "n.gguf", "fp32", check=False, tokenizer_pre="gpt-2")
    assert (checked.tokens.status, checked.logits.status) == ("skipped", "skipped")
    assert checked.logits.detail == "--no-verify was given" and checked.pre == "gpt-2"


def test_sharded_output_has_an_index_and_reloads(trained, tmp_path):
    out = tmp_path / "sharded"
    merge_mod.merge(trained, out, check=False, file_gib=0.0002, dtype="bf16")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and all((out / s).is_file() for s in shards)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16


def test_failed_verification_leaves_nothing(trained, tmp_path, monkeypatch):
    real = merge_mod.merged
    monkeypatch.setattr(merge_mod, "merged", lambda name, *a: real(name, *a) * (1.01 if "q_proj" in name else 1))
    out = tmp_path / "bad"
    with pytest.raises(PiLoraError, match="verification failed"):
        merge_mod.merge(trained, out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_interrupted_merge_leaves_nothing(trained, tmp_path, monkeypatch):
    calls = []

    def dying(*a, **k):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_mod, "save_file", dying)
    with pytest.raises(KeyboardInterrupt):
        merge_mod.merge(trained, tmp_path / "cut", check=False, file_gib=0.0002)
    assert calls and not list(tmp_path.iterdir())


def test_bad_inputs(trained, tmp_path, monkeypatch):
    nothing = tmp_path / "empty"
    nothing.mkdir()
    result = RUNNER.invoke(app, ["merge", str(nothing)])
    assert result.exit_code == 2 and "not a pi-lora run folder" in result.output
    no_adapter = tmp_path / "no-adapter"
    shutil.copytree(trained, no_adapter, ignore=shutil.ignore_patterns("adapter"))
    result = RUNNER.invoke(app, ["merge", str(no_adapter)])
    assert result.exit_code == 2 and "no adapter" in result.output
    exists = tmp_path / "exists"
    exists.mkdir()
    result = RUNNER.invoke(app, ["merge", str(trained), "--output", str(exists)])
    assert result.exit_code == 2 and "--overwrite" in result.output
    result = RUNNER.invoke(app, ["merge", str(trained), "--dtype", "int3"])
    assert result.exit_code == 2

    import collections

    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(merge_mod.shutil, "disk_usage", lambda p: Usage(10, 10, 1000))
    result = RUNNER.invoke(app, ["merge", str(trained), "--output", str(tmp_path / "full-disk")])
    assert result.exit_code == 2 and "not enough disk" in result.output
    assert not (tmp_path / "full-disk").exists()


def test_adapters_pi_lora_does_not_make_are_refused(trained, tmp_path):
    """merge scales by alpha / r, as pi-lora trains: an rsLoRA or DoRA adapter is refused, not mis-merged."""
    for key in ("use_rslora", "use_dora"):
        copy = tmp_path / key
        shutil.copytree(trained, copy)
        config = json.loads((copy / "adapter" / "adapter_config.json").read_text())
        (copy / "adapter" / "adapter_config.json").write_text(json.dumps({**config, key: True}))
        with pytest.raises(PiLoraError, match="not supported by merge"):
            merge_mod.merge(copy, tmp_path / f"{key}-merged", check=False)
        assert not (tmp_path / f"{key}-merged").exists()


def test_base_with_other_shapes_is_refused(trained, tmp_path):
    from pi_lora.demo import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    result = RUNNER.invoke(app, ["merge", str(trained), "--base", str(other), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "does not match the adapter" in result.output
    assert not (tmp_path / "o").exists()


def test_peft_export_loads_with_the_snippet_and_matches_merged(trained, tiny_base, tmp_path):
    out = tmp_path / "peft"
    result = RUNNER.invoke(app, ["export", str(trained), "--format", "peft", "--output", str(out)])
    assert result.exit_code == 0, result.output
    readme = (out / "README.md").read_text()
    snippet = readme.split("```python\n")[1].split("```")[0]
    scope = {}
    exec(snippet, scope)  # the README's own loading code
    loaded = scope["model"].eval()
    assert loaded.config.rope_parameters["factor"] == 4.0
    merged = tmp_path / "merged"
    merge_mod.merge(trained, merged, check=False)
    ids = torch.randint(0, 500, (1, 150), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert RUNNER.invoke(app, ["export", str(trained), "--format", "onnx"]).exit_code == 2
    assert RUNNER.invoke(app, ["export", str(trained), "--output", str(out)]).exit_code == 2


@pytest.mark.parametrize("outtype", ["fp16", "bf16", "q8_0"])
def test_gguf_export_round_trips_through_transformers(trained, tmp_path, outtype):
    from gguf import GGUFReader

    from pi_lora import export

    out = tmp_path / f"m-{outtype}.gguf"
    result = RUNNER.invoke(app, ["export", str(trained), "--format", "gguf", "--dtype", outtype, "--output", str(out),
                                 "--tokenizer-pre", "gpt-2"])  # the demo tokenizer's split is GPT-2's
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "verified: transformers reads the GGUF back with the merged model's logits" in said
    assert "verified: transformers reads the GGUF's tokenizer (pre-tokenizer 'gpt-2') with identical" in said
    fields = {k: f.contents() for k, f in GGUFReader(out).fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["llama.context_length"] == 256
    assert fields["llama.rope.scaling.type"] == "yarn" and fields["llama.rope.scaling.factor"] == 4.0
    assert fields["llama.rope.scaling.original_context_length"] == 64
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == 512
    reloaded = export.read_gguf(out)
    assert reloaded.config.rope_parameters["factor"] == 4.0
    from transformers import AutoTokenizer

    text = "And God said, Let there be light: and there was light."
    hf = AutoTokenizer.from_pretrained(run.read_meta(trained)["base"])
    assert AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)(text)["input_ids"] == hf(text)["input_ids"]
    assert not list(tmp_path.glob(".*"))  # no scratch left


def test_gguf_export_without_permutation_would_fail(trained, tmp_path, monkeypatch):
    """The Q/K permutation is what llama.cpp (and transformers' GGUF reader) expect: the check catches its loss."""
    from pi_lora import export

    monkeypatch.setattr(export, "permute_qk", lambda w, n: w)
    with pytest.raises(PiLoraError, match="round trip failed"):
        export.export_gguf(trained, tmp_path / "bad.gguf", "fp32", tokenizer_pre="gpt-2")
    assert not (tmp_path / "bad.gguf").exists()


def test_dequantized_merge_weights_equal_the_nf4_training_weights_after_an_eval_forward(trained, tmp_path):
    """Oracle: bitsandbytes' dequantization of the loaded NF4 base (after an eval forward, the known trap)."""
    import bitsandbytes as bnb
    from safetensors import safe_open

    from pi_lora import model
    from pi_lora.recipe import ModelSection

    meta = run.read_meta(trained)
    config = AutoConfig.from_pretrained(meta["base_path"])
    config.rope_parameters = meta["rope_parameters"]
    nf4 = model.load_base(ModelSection(base=meta["base_path"], quant="nf4"), config, torch.device("cpu"))
    nf4.eval()
    with torch.no_grad():
        nf4(input_ids=torch.randint(0, 500, (1, 32)))
    out = tmp_path / "deq"
    merge_mod.merge(trained, out, into="dequantized", check=False)
    adapter = merge_mod.read_adapter(trained / "adapter")
    name = "model.layers.1.self_attn.v_proj.weight"
    layer = nf4.model.layers[1].self_attn.v_proj
    want = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    want = want + adapter.delta(name, want.shape)
    with safe_open(out / "model.safetensors", "pt") as f:
        got = f.get_tensor(name)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_dequantized_merge_with_default_targets_and_bf16_training(tiny_base, corpus, tmp_path):
    """q/k/v/o only (the MLP is NF4 in training too), and a bf16 base quantized from bf16 as on a GPU."""
    from transformers import AutoTokenizer

    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(base)
    out = tmp_path / "qkvo"
    result = RUNNER.invoke(app, ["train", "--base", str(base), "--target-len", "256", "--data", str(corpus),
                                 "--output", str(out), "--steps", "2", "--grad-accum", "1", "--lr", "1e-2",
                                 "--set", "train.warmup_steps=0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # merged weights are stored in bf16 like the base: the check allows for that rounding only
    assert merge_mod.merge(out, tmp_path / "m1", into="dequantized").error < 1e-2
    assert merge_mod.merge(out, tmp_path / "m1-fp32", into="dequantized", dtype="fp32").error < 1e-4
    meta = run.read_meta(out)
    run.write_json(out / run.META, {**meta, "compute_dtype": "bfloat16"})
    assert merge_mod.merge(out, tmp_path / "m2", into="dequantized", dtype="fp32").error < 1e-4


def test_tied_base_with_trained_embeddings_merges(corpus, tmp_path):
    from pi_lora.demo import build_tiny_llama

    base = build_tiny_llama(tmp_path / "tied", tie_word_embeddings=True, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64)
    out = tmp_path / "run"
    result = RUNNER.invoke(app, ["train", "--base", str(base), "--target-len", "128", "--data", str(corpus),
                                 "--output", str(out), "--steps", "2", "--grad-accum", "1", "--lr", "1e-2",
                                 "--set", "lora.trainable=[embed, norm]"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert merge_mod.merge(out, tmp_path / "merged").error < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    trained_embed = peft_reference(base, out).merge_and_unload().model.embed_tokens.weight
    torch.testing.assert_close(merged.model.embed_tokens.weight, trained_embed)


def test_dequantized_needs_a_4bit_run(trained, tmp_path):
    meta = run.read_meta(trained)
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    run.write_json(copy / run.META, {**meta, "quant": "none"})
    with pytest.raises(PiLoraError, match="needs a run trained on a 4-bit base"):
        merge_mod.merge(copy, tmp_path / "o", into="dequantized")
