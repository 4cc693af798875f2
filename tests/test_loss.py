"""The chunked LM head + loss equals the plain computation, in value and in every gradient."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from pi_lora import loss, model
from pi_lora.demo import build_tiny_llama
from pi_lora.recipe import LoraSection


def lora_net(folder, seed=0):
    torch.manual_seed(seed)
    net = model.add_lora(AutoModelForCausalLM.from_pretrained(folder), LoraSection(rank=4, trainable=["embed", "norm"]),
                         gradient_checkpointing=True)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return net.train()


def grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_equals_plain(tmp_path_factory, tied, chunk):
    folder = build_tiny_llama(tmp_path_factory.mktemp("m") / "m", tie_word_embeddings=tied, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=64)
    ids = torch.randint(0, 500, (2, 50), generator=torch.Generator().manual_seed(1))
    plain = lora_net(folder)
    want = plain(input_ids=ids, labels=ids).loss
    (want * 0.5).backward()
    chunked = lora_net(folder)
    got = loss.backward(chunked, ids, scale=0.5, chunk=chunk)
    assert got == pytest.approx(want.item(), rel=1e-6)
    g_plain, g_chunked = grads(plain), grads(chunked)
    assert g_plain.keys() == g_chunked.keys() and any("embed_tokens" in k for k in g_plain)
    for name in g_plain:
        torch.testing.assert_close(g_chunked[name], g_plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_offloaded_activations_give_the_same_loss_and_gradients(tiny_base):
    ids = torch.randint(0, 500, (1, 40), generator=torch.Generator().manual_seed(3))
    plain, offloaded = lora_net(tiny_base), lora_net(tiny_base)
    want = loss.backward(plain, ids, chunk=16)
    got = loss.backward(offloaded, ids, chunk=16, offload=True)  # on a GPU the saved inputs go to pinned CPU
    assert got == pytest.approx(want, rel=1e-6)
    for name, g in grads(plain).items():
        torch.testing.assert_close(grads(offloaded)[name], g, rtol=1e-5, atol=1e-7, msg=name)
