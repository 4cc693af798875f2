"""YaRN, NTK-aware and already-scaled (llama3) bases through train, merge and reload on a tiny LLaMA."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from pi_lora import run
from pi_lora.cli import app
from pi_lora.demo import build_tiny_llama

RUNNER = CliRunner()
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def llama3_base(tmp_path_factory):
    """A tiny base scaled the Llama-3.1 way: trained to 32, factor 2, 64 positions."""
    folder = build_tiny_llama(tmp_path_factory.mktemp("l3") / "model", **TINY)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 2.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def train_and_merge(base, corpus, out, *extra):
    argv = ["train", "--base", str(base), "--target-len", "256", "--data", str(corpus), "--output", str(out),
            "--steps", "2", "--lr", "1e-2", "--grad-accum", "1", "--rank", "4", "--set", "train.warmup_steps=0",
            "--set", "lora.trainable=[norm]", *extra]
    result = RUNNER.invoke(app, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    merged = RUNNER.invoke(app, ["merge", str(out)], catch_exceptions=False)
    assert merged.exit_code == 0 and "verified" in merged.output, merged.output  # merged == base + adapter
    return run.read_meta(out), json.loads((out / run.MERGED / "config.json").read_text())


def reloaded_logits_equal_base_plus_adapter(base, out):
    meta = run.read_meta(out)
    config = AutoConfig.from_pretrained(base)
    config.rope_parameters = meta["rope_parameters"]
    config.max_position_embeddings = meta["target_len"]
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, config=config),
                                          out / run.ADAPTER).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / run.MERGED).eval()
    ids = torch.randint(0, 400, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_yarn_trains_merges_and_reloads(tiny_base, corpus, tmp_path):
    meta, config = train_and_merge(tiny_base, corpus, tmp_path / "yarn", "--scaling", "yarn",
                                   "--set", "rope.beta_fast=16")
    assert meta["rope_parameters"] == {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                       "original_max_position_embeddings": 64, "beta_fast": 16.0}
    assert config["rope_parameters"] == meta["rope_parameters"] and config["max_position_embeddings"] == 256
    assert config["rope_scaling"]["type"] == "yarn"
    reloaded_logits_equal_base_plus_adapter(tiny_base, tmp_path / "yarn")


def test_ntk_trains_with_a_larger_theta(tiny_base, corpus, tmp_path):
    meta, config = train_and_merge(tiny_base, corpus, tmp_path / "ntk", "--scaling", "ntk")
    theta = 10000.0 * 4 ** (16 / 14)
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": pytest.approx(theta)}
    assert config["rope_scaling"] is None and meta["rope_type"] == "ntk" and meta["factor"] == 4.0
    reloaded_logits_equal_base_plus_adapter(tiny_base, tmp_path / "ntk")


def test_a_llama3_base_is_extended_in_its_own_kind(llama3_base, corpus, tmp_path):
    meta, config = train_and_merge(llama3_base, corpus, tmp_path / "l3")
    assert (meta["base_len"], meta["original_len"], meta["factor"]) == (64, 32, 8.0)
    assert config["rope_parameters"] == {"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0,
                                         "original_max_position_embeddings": 32, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0}
    reloaded_logits_equal_base_plus_adapter(llama3_base, tmp_path / "l3")


@pytest.mark.parametrize("extra,message", [
    (["--set", "rope.scaling=dynamic"], "what is trained would not be what runs"),
    (["--scaling", "ntk", "--set", "rope.beta_fast=8"], "apply to yarn only"),
])
def test_refused_settings_are_one_line_exit_2(tiny_base, corpus, tmp_path, extra, message):
    argv = ["train", "--base", str(tiny_base), "--target-len", "256", "--data", str(corpus),
            "--output", str(tmp_path / "r"), *extra]
    result = RUNNER.invoke(app, argv)
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert not (tmp_path / "r").exists()


def gguf_fields(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def export_gguf(out):
    result = RUNNER.invoke(app, ["export", str(out), "--format", "gguf", "--dtype", "fp32",
                                 "--tokenizer-pre", "gpt-2"], catch_exceptions=False)
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "back with the merged model's logits (max" in said, result.output  # compared
    return gguf_fields(run.gguf_name(out, "fp32"))


def test_gguf_keys_for_yarn_and_ntk(tiny_base, corpus, tmp_path):
    train_and_merge(tiny_base, corpus, tmp_path / "yarn", "--scaling", "yarn", "--set", "rope.beta_fast=16")
    fields, _ = export_gguf(tmp_path / "yarn")
    assert fields["llama.rope.scaling.type"] == "yarn" and fields["llama.rope.scaling.factor"] == 4.0
    assert fields["llama.rope.scaling.original_context_length"] == 64
    assert fields["llama.rope.scaling.yarn_beta_fast"] == 16.0 and fields["llama.rope.freq_base"] == 10000.0
    train_and_merge(tiny_base, corpus, tmp_path / "ntk", "--scaling", "ntk")
    fields, _ = export_gguf(tmp_path / "ntk")
    assert "llama.rope.scaling.type" not in fields
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0 * 4 ** (16 / 14), rel=1e-6)


def test_gguf_of_a_llama3_base_holds_its_frequency_divisors(llama3_base, corpus, tmp_path):
    """Oracle: llama.cpp's converter's own formula for rope_freqs (1, factor, or smooth between)."""
    import math

    train_and_merge(llama3_base, corpus, tmp_path / "l3")
    _, tensors = export_gguf(tmp_path / "l3")
    factor, low, high, old = 8.0, 1.0, 4.0, 32
    want = []
    for i in range(0, 16, 2):
        wavelen = 2 * math.pi * 10000.0 ** (i / 16)
        if wavelen < old / high:
            want.append(1.0)
        elif wavelen > old / low:
            want.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            want.append(1 / ((1 - smooth) / factor + smooth))
    assert list(tensors["rope_freqs.weight"].data) == pytest.approx(want, rel=1e-5)
