"""Tiled MLP equals the plain MLP, in values and gradients, inside a LoRA model with checkpointing."""

import pytest
import torch

from pi_lora import memory, model, plan, train
from pi_lora.recipe import Recipe


def build(folder, quant="none", compute="fp32", narrow_to=None, **lora):
    """The model `pi-lora train` builds (train.build_model), untiled; `narrow_to`: the dtype it narrows
    to (default: the compute dtype; fp32 leaves peft's k-bit fp32 upcast as it is)."""
    recipe = Recipe.model_validate({"model": {"base": str(folder), "quant": quant, "compute_dtype": compute},
                                    "lora": lora, "train": {"mlp_tile": 0}})
    on = torch.device("cpu")
    dtype = model.compute_dtype(compute, on)
    settings = plan.Settings.of(recipe, dtype.itemsize)
    torch.manual_seed(0)
    return train.build_model(recipe, model.load_config(str(folder)), on, narrow_to or dtype, settings).train()


def lora_net(folder):
    net = build(folder, rank=4, target_modules="all-linear", trainable=["norm"])
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return net


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


def nf4_net(folder, trainable):
    return build(folder, quant="nf4", compute="bf16", narrow_to=torch.float32, rank=4, trainable=trainable)


def saved_dtypes(net, ids):
    """Dtypes of the (batch, length, hidden) tensors the forward keeps for backward, and the loss."""
    from pi_lora import loss

    seen = []

    def pack(t):
        if t.dim() == 3 and t.shape[:2] == ids.shape and t.shape[2] == net.config.hidden_size:
            seen.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = loss.backward(net, ids, 1.0, 16, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    return seen, value


@pytest.mark.parametrize("trainable", [[], ["embed", "norm"]])
def test_narrow_keeps_frozen_embeddings_and_residual_in_bf16(tiny_base, trainable):
    ids = torch.randint(0, 500, (1, 40), generator=torch.Generator().manual_seed(2))
    wide = nf4_net(tiny_base, trainable)
    wide_saved, want = saved_dtypes(wide, ids)
    assert wide_saved and set(wide_saved) == {torch.float32}  # the k-bit preparation's fp32 residual stream

    net = nf4_net(tiny_base, trainable)
    trained = {n: p.dtype for n, p in net.named_parameters() if p.requires_grad}
    config = net.config
    # the head, and the embedding (the frozen original beside peft's trained copy, when it is trained)
    assert memory.narrow(net, torch.bfloat16) == config.vocab_size * config.hidden_size * 2 * 2
    inner = net.get_base_model()
    assert inner.lm_head.weight.dtype == torch.bfloat16
    assert {n: p.dtype for n, p in net.named_parameters() if p.requires_grad} == trained  # all fp32, untouched
    assert all(p.dtype == torch.float32 for n, p in net.named_parameters() if "norm" in n)
    got_saved, got = saved_dtypes(net, ids)
    layers = config.num_hidden_layers
    assert len(got_saved) == len(wide_saved)
    # the checkpointed layer inputs (and a trained final norm's output) are 16-bit; only the final
    # RMSNorm's internals stay fp32, as it computes in fp32
    assert got_saved.count(torch.bfloat16) >= layers and got_saved.count(torch.float32) == 2, got_saved
    assert abs(got - want) / want < 2e-2  # a bf16 residual, not a different model


def test_narrow_changes_nothing_in_fp32(tiny_base):
    net = lora_net(tiny_base)
    before = {n: p.dtype for n, p in net.named_parameters()}
    assert memory.narrow(net, torch.float32) == 0
    assert {n: p.dtype for n, p in net.named_parameters()} == before
