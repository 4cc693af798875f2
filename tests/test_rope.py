import math

import pytest
import torch
from transformers import AutoConfig, BloomConfig, GPT2Config, LlamaConfig, LlamaForCausalLM

from pi_lora import rope
from pi_lora.errors import PiLoraError


def llama_config(**kw):
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=1e5,
                initializer_range=0.2)  # sharp attention, so positions move the logits
    return LlamaConfig(**{**base, **kw})


def test_factor_is_exact_and_theta_kept():
    pi = rope.interpolation(llama_config(), 100, "linear")
    assert pi.original_len == 64 and pi.factor == 100 / 64
    assert pi.rope_parameters() == {"rope_type": "linear", "factor": 1.5625, "rope_theta": 1e5}


@pytest.mark.parametrize("factor", [2, 4])
def test_pi_logits_equal_unscaled_model_at_divided_positions(factor):
    """Oracle: transformers' unscaled model. Scaled logits at p = s*q equal unscaled logits at q."""
    torch.manual_seed(0)
    plain = LlamaForCausalLM(llama_config()).eval()
    config = llama_config()
    rope.apply(config, rope.interpolation(config, 64 * factor, "linear"))
    scaled = LlamaForCausalLM(config).eval()
    scaled.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 97, (1, 40))
    q = torch.arange(40)[None]
    with torch.no_grad():
        want = plain(input_ids=ids, position_ids=q).logits
        got = scaled(input_ids=ids, position_ids=q * factor).logits
        unscaled_far = plain(input_ids=ids, position_ids=q * factor).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (unscaled_far - want).abs().max() > 1e-2  # 1000x the tolerance: positions do matter


def test_rotary_angles_are_interpolated_at_every_position():
    config = llama_config()
    rope.apply(config, rope.interpolation(config, 256, "linear"))
    plain, scaled = LlamaForCausalLM(llama_config()).model.rotary_emb, LlamaForCausalLM(config).model.rotary_emb
    x = torch.zeros(1, 1, 16)
    p = torch.arange(256, dtype=torch.float32)[None]
    cos_s, sin_s = scaled(x, p)
    cos_p, sin_p = plain(x, p / 4)
    torch.testing.assert_close(cos_s, cos_p)
    torch.testing.assert_close(sin_s, sin_p)


def test_apply_survives_save_and_reload(tmp_path):
    config = llama_config()
    rope.apply(config, rope.interpolation(config, 256, "linear"))
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert again.rope_parameters["rope_theta"] == 1e5 and again.rope_parameters["factor"] == 4
    assert again.max_position_embeddings == 256
    assert rope.original_len(again) == 64  # a PI'd model knows its pretrained length


def test_extending_an_extended_model_counts_from_the_original():
    config = llama_config()
    rope.apply(config, rope.interpolation(config, 128, "linear"))
    again = rope.interpolation(config, 512)  # unset: a linear base stays linear
    assert (again.rope_type, again.factor) == ("linear", 8)


@pytest.mark.parametrize("params, kind", [
    (None, "yarn"),  # plain RoPE: YaRN, the measured best
    ({"rope_type": "linear", "rope_theta": 1e5, "factor": 2.0}, "linear"),
    ({"rope_type": "yarn", "rope_theta": 1e5, "factor": 2.0, "original_max_position_embeddings": 64}, "yarn"),
    ({"rope_type": "llama3", "rope_theta": 1e5, "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}, "llama3"),
])
def test_unset_scaling_is_yarn_for_plain_rope_and_a_scaled_base_s_own_kind(params, kind):
    config = llama_config(**({"rope_parameters": params, "max_position_embeddings": 128} if params else {}))
    assert rope.interpolation(config, 1024).rope_type == kind


def test_target_not_longer_is_refused():
    with pytest.raises(PiLoraError, match="trained length 64"):
        rope.interpolation(llama_config(), 64)


@pytest.mark.parametrize("config, words", [(GPT2Config(), "absolute"), (BloomConfig(), "ALiBi")])
def test_non_rope_models_are_refused_by_name(config, words):
    with pytest.raises(PiLoraError, match=words) as e:
        rope.interpolation(config, 8192)
    assert config.model_type in str(e.value)


def test_other_scaled_rope_is_refused():
    config = llama_config(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(PiLoraError, match="dynamic"):
        rope.interpolation(config, 1024)


# --- the other scalings, each against transformers' own rope init functions as the oracle ---

def rotary(config):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    emb = LlamaRotaryEmbedding(config)
    return emb.inv_freq, emb.attention_scaling


def by_hand(rope_type, **params):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = llama_config(rope_parameters={"rope_type": rope_type, "rope_theta": 1e5, **params},
                          max_position_embeddings=params.pop("max_position_embeddings", 256))
    return ROPE_INIT_FUNCTIONS[rope_type](config, None)


def test_yarn_frequencies_and_attention_scaling_equal_transformers():
    config = llama_config()
    pi = rope.interpolation(config, 256, "yarn", beta_fast=16.0)
    rope.apply(config, pi)
    inv_freq, scaling = rotary(config)
    want_freq, want_scaling = by_hand("yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=16.0)
    torch.testing.assert_close(inv_freq, want_freq)
    assert scaling == pytest.approx(want_scaling) == pytest.approx(0.1 * math.log(4) + 1)
    assert pi.rope_scaling()["type"] == "yarn" and pi.rope_scaling()["original_max_position_embeddings"] == 64


def test_ntk_raises_theta_by_the_formula():
    config = llama_config()  # head_dim 16
    pi = rope.interpolation(config, 256, "ntk")
    rope.apply(config, pi)
    theta = 1e5 * 4 ** (16 / 14)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": pytest.approx(theta)}
    assert config.max_position_embeddings == 256 and pi.rope_scaling() is None
    inv_freq, _ = rotary(config)
    torch.testing.assert_close(inv_freq, 1.0 / theta ** (torch.arange(0, 16, 2).float() / 16))


def test_dynamic_keeps_the_trained_length_and_is_refused_for_training():
    config = llama_config()
    pi = rope.interpolation(config, 256, "dynamic")
    rope.apply(config, pi)
    assert config.rope_parameters["rope_type"] == "dynamic" and config.max_position_embeddings == 64
    with pytest.raises(PiLoraError, match="what is trained would not be what runs"):
        rope.check_trainable(pi)


def test_a_llama3_base_raises_its_own_factor_keeping_its_bands():
    params = {"rope_type": "llama3", "rope_theta": 1e5, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = llama_config(rope_parameters=params, max_position_embeddings=1024)
    pi = rope.interpolation(config, 4096)
    assert (pi.base_len, pi.original_len, pi.factor, pi.rope_type) == (1024, 64, 32.0, "llama3")
    rope.apply(config, pi)
    want, _ = by_hand("llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64, max_position_embeddings=4096)
    torch.testing.assert_close(rotary(config)[0], want)
    with pytest.raises(PiLoraError, match="llama3-scaled base"):
        rope.interpolation(llama_config(rope_parameters=params, max_position_embeddings=1024), 4096, "yarn")


def test_a_yarn_base_raises_its_factor_against_its_original_length():
    params = {"rope_type": "yarn", "rope_theta": 1e5, "factor": 2.0, "original_max_position_embeddings": 64,
              "beta_fast": 8.0}
    config = llama_config(rope_parameters=params, max_position_embeddings=128)
    pi = rope.interpolation(config, 512)
    assert (pi.base_len, pi.factor, pi.rope_type, pi.extra) == (128, 8.0, "yarn", {"beta_fast": 8.0})
    rope.apply(config, pi)
    want, _ = by_hand("yarn", factor=8.0, original_max_position_embeddings=64, beta_fast=8.0,
                      max_position_embeddings=512)
    torch.testing.assert_close(rotary(config)[0], want)


def test_original_len_overrides_a_config_that_claims_more():
    config = llama_config(max_position_embeddings=256)  # as Mistral-7B: trained to 64, claims 256
    pi = rope.interpolation(config, 512, original_len=64)
    assert (pi.original_len, pi.factor) == (64, 8.0)


@pytest.mark.parametrize("params", [
    {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8, "long_factor": [1.0] * 8,
     "original_max_position_embeddings": 32},
    {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
])
def test_other_base_scalings_are_refused_by_name(params):
    with pytest.raises(PiLoraError, match=params["rope_type"]):
        rope.interpolation(llama_config(rope_parameters=params), 1024)


def test_a_run_s_setting_comes_back_from_its_metadata():
    pi = rope.interpolation(llama_config(), 256, "yarn", attention_factor=1.2)
    assert rope.from_meta(pi.as_dict()) == pi
