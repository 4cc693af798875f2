"""LoRA gradients on the NF4 base against a dequantized fp32 reference, before and after an eval forward."""

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pi_lora import model, quant, rope
from pi_lora.recipe import LoraSection, ModelSection

AVX512_BF16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text()


def pi_config(base):
    config = AutoConfig.from_pretrained(base)
    rope.apply(config, rope.interpolation(config, 256))
    return config


def quantized_lora(base, protect=True):
    section = ModelSection(base=str(base), quant="nf4")
    net = model.load_base(section, pi_config(base), torch.device("cpu"), protect=protect)
    net = model.add_lora(net, LoraSection(rank=4, trainable=["norm"]), gradient_checkpointing=True)
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero B so that A gets a gradient too
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return net


def reference(base, net):
    """fp32 model whose linear weights are dequant(NF4) of `net`, with the same LoRA weights."""
    ref = AutoModelForCausalLM.from_pretrained(base, config=pi_config(base), dtype=torch.float32)
    modules = dict(ref.named_modules())
    for name, layer in net.base_model.model.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            modules[name.replace(".base_layer", "")].weight.data = w.float()
    ref = model.add_lora(ref, LoraSection(rank=4, trainable=["norm"]), gradient_checkpointing=True)
    ref.load_state_dict({k: v for k, v in net.state_dict().items() if "lora_" in k or "modules_to_save" in k},
                        strict=False)
    return ref


def lora_grads(net, ids):
    net.train()
    net.zero_grad()
    net(input_ids=ids, labels=ids).loss.backward()
    # a repacked layer drops gradients altogether: count a missing one as zero
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for n, p in net.named_parameters() if p.requires_grad}


def assert_same_grads(got, want):
    assert got.keys() == want.keys() and any("lora_A" in k for k in got)
    for name in want:
        err = (got[name] - want[name]).norm() / want[name].norm()
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


def eval_forward(net, ids):
    net.eval()
    with torch.no_grad():
        net(input_ids=ids)
    net.train()


def test_lora_gradients_match_dequantized_reference_fresh_and_after_eval(tiny_base):
    torch.manual_seed(0)
    ids = torch.randint(0, 500, (1, 96))
    net = quantized_lora(tiny_base)
    ref = reference(tiny_base, net)
    want = lora_grads(ref, ids)
    assert_same_grads(lora_grads(net, ids), want)
    eval_forward(net, ids)  # the bitsandbytes trap: this repacks unprotected 4-bit layers
    assert quant.repacked(net) == 0
    assert_same_grads(lora_grads(net, ids), want)


@pytest.mark.skipif(not AVX512_BF16, reason="bitsandbytes repacks only on CPUs with AVX512-BF16")
def test_unprotected_model_falls_into_the_trap_and_is_detected(tiny_base):
    torch.manual_seed(0)
    ids = torch.randint(0, 500, (1, 96))
    net = quantized_lora(tiny_base, protect=False)
    want = lora_grads(reference(tiny_base, net), ids)
    eval_forward(net, ids)
    assert quant.repacked(net) > 0
    with pytest.raises(Exception, match="repacked"):
        quant.check(net)
    with pytest.raises(AssertionError, match="relative error"):
        assert_same_grads(lora_grads(net, ids), want)
