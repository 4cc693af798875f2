"""Tiled MLP equals the plain MLP, in values and gradients, inside a LoRA model with checkpointing."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from pi_lora import memory, model
from pi_lora.recipe import LoraSection


def lora_net(folder):
    torch.manual_seed(0)
    net = model.add_lora(AutoModelForCausalLM.from_pretrained(folder),
                         LoraSection(rank=4, target_modules="all-linear", trainable=["norm"]), gradient_checkpointing=True)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return net.train()


@pytest.mark.parametrize("tile", [1, 16, 50, 200])
def test_tiled_mlp_equals_plain(tiny_base, tile):
    ids = torch.randint(0, 500, (2, 50), generator=torch.Generator().manual_seed(1))
    plain = lora_net(tiny_base)
    want = plain(input_ids=ids, labels=ids).loss
    want.backward()
    tiled = lora_net(tiny_base)
    assert memory.tile_mlps(tiled, tile) == 2
    got = tiled(input_ids=ids, labels=ids).loss
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for (name, a), (_, b) in zip(plain.named_parameters(), tiled.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in tiled.named_parameters()]
