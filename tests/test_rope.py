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
    pi = rope.interpolation(llama_config(), 100)
    assert pi.original_len == 64 and pi.factor == 100 / 64
    assert pi.rope_parameters() == {"rope_type": "linear", "factor": 1.5625, "rope_theta": 1e5}


@pytest.mark.parametrize("factor", [2, 4])
def test_pi_logits_equal_unscaled_model_at_divided_positions(factor):
    """Oracle: transformers' unscaled model. Scaled logits at p = s*q equal unscaled logits at q."""
    torch.manual_seed(0)
    plain = LlamaForCausalLM(llama_config()).eval()
    config = llama_config()
    rope.apply(config, rope.interpolation(config, 64 * factor))
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
    rope.apply(config, rope.interpolation(config, 256))
    plain, scaled = LlamaForCausalLM(llama_config()).model.rotary_emb, LlamaForCausalLM(config).model.rotary_emb
    x = torch.zeros(1, 1, 16)
    p = torch.arange(256, dtype=torch.float32)[None]
    cos_s, sin_s = scaled(x, p)
    cos_p, sin_p = plain(x, p / 4)
    torch.testing.assert_close(cos_s, cos_p)
    torch.testing.assert_close(sin_s, sin_p)


def test_apply_survives_save_and_reload(tmp_path):
    config = llama_config()
    rope.apply(config, rope.interpolation(config, 256))
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert again.rope_parameters["rope_theta"] == 1e5 and again.rope_parameters["factor"] == 4
    assert again.max_position_embeddings == 256
    assert rope.original_len(again) == 64  # a PI'd model knows its pretrained length


def test_extending_an_extended_model_counts_from_the_original():
    config = llama_config()
    rope.apply(config, rope.interpolation(config, 128))
    assert rope.interpolation(config, 512).factor == 8


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
