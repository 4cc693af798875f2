"""Tiled MLP equals the plain MLP, in values and gradients, inside a LoRA model with checkpointing."""

import pytest
import torch

from pi_lora import memory, model, plan
from pi_lora.recipe import Recipe


def build(folder, quant="none", compute="fp32", narrow_to=None, **lora):
    """The model `pi-lora train` builds (model.build), untiled; `narrow_to`: the dtype it narrows
    to (default: the compute dtype; fp32 leaves peft's k-bit fp32 upcast as it is)."""
    recipe = Recipe.model_validate({"model": {"base": str(folder), "quant": quant, "compute_dtype": compute},
                                    "lora": lora, "train": {"mlp_tile": 0}})
    on = torch.device("cpu")
    dtype = model.compute_dtype(compute, on)
    settings = plan.Settings.of(recipe, dtype.itemsize)
    torch.manual_seed(0)
    return model.build(recipe, model.load_config(str(folder)), on, narrow_to or dtype, settings).train()


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


def attention_net(folder, compute, tile, checkpointing=True):
    """LoRA on every linear, embeddings and norms trained, LoRA B non-zero; the attention block tiled."""
    recipe = Recipe.model_validate({"model": {"base": str(folder), "quant": "none", "compute_dtype": compute},
                                    "lora": {"rank": 4, "target_modules": "all-linear", "trainable": ["embed", "norm"]},
                                    "train": {"mlp_tile": 0, "attention_tile": tile,
                                              "gradient_checkpointing": checkpointing}})
    on = torch.device("cpu")
    dtype = model.compute_dtype(compute, on)
    torch.manual_seed(0)
    net = model.build(recipe, model.load_config(str(folder)), on, dtype,
                            plan.Settings.of(recipe, dtype.itemsize)).train()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return net, dtype


def loss_and_grads(net, dtype, ids):
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)
    with autocast:
        value = net(input_ids=ids, labels=ids).loss
    value.backward()
    return value.detach(), {n: p.grad for n, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("compute,tile", [("fp32", 1), ("fp32", 16), ("fp32", 50), ("bf16", 16)])
def test_tiled_attention_equals_plain(tiny_base, compute, tile):
    ids = torch.randint(0, 500, (2, 50), generator=torch.Generator().manual_seed(3))
    plain, dtype = attention_net(tiny_base, compute, 0)
    config = plain.config
    assert config.num_key_value_heads < config.num_attention_heads  # grouped KV heads
    want, want_grads = loss_and_grads(plain, dtype, ids)
    tiled, _ = attention_net(tiny_base, compute, tile)
    got, got_grads = loss_and_grads(tiled, dtype, ids)
    tol = dict(rtol=1e-5, atol=1e-6) if compute == "fp32" else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got, want, **tol)
    assert want_grads.keys() == got_grads.keys()
    assert any("embed_tokens" in n for n in want_grads) and any("layernorm" in n for n in want_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, **tol, msg=name)


def test_tiled_attention_runs_tiles(tiny_base):
    """The tiles are real: the q projection sees `tile` positions at a time, and the layer is still checkpointed."""
    net, dtype = attention_net(tiny_base, "fp32", 16)
    seen = []
    q = net.get_base_model().model.layers[0].self_attn.q_proj
    q.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    loss_and_grads(net, dtype, torch.randint(0, 500, (1, 40)))
    # forward, the layer's recompute, then each tile's recompute as backward reaches it (last first)
    assert seen == [16, 16, 8, 16, 16, 8, 8, 16, 16]


@pytest.mark.parametrize("checkpointed", [0, 1, 2])
def test_partial_checkpointing_recomputes_only_the_first_layers(tiny_base, checkpointed):
    ids = torch.randint(0, 500, (1, 30), generator=torch.Generator().manual_seed(4))
    full, dtype = attention_net(tiny_base, "fp32", 0, True)
    want, want_grads = loss_and_grads(full, dtype, ids)
    for tile in (0, 8):
        net, _ = attention_net(tiny_base, "fp32", tile, checkpointed)
        calls = []
        for i, layer in enumerate(net.get_base_model().model.layers):
            # a pre-hook: a recompute stops early, once it has what backward needs, before the MLP returns
            layer.mlp.register_forward_pre_hook(lambda module, args, i=i: calls.append(i))
        got, grads = loss_and_grads(net, dtype, ids)
        assert calls.count(0) == (2 if checkpointed >= 1 else 1)  # a checkpointed layer runs again in backward
        assert calls.count(1) == (2 if checkpointed >= 2 else 1)
        torch.testing.assert_close(got, want)
        for name, grad in want_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def weight_matmuls(net, run) -> list:
    """The batched matmuls (aten::bmm) `run()` makes with one of `net`'s linear weights as an operand:
    torch.matmul broadcasts a weight into one only when it cannot fold its input into an mm, and on
    CPU it then copies the whole weight for every call."""
    from torch.profiler import ProfilerActivity, profile

    pairs = {(m.in_features, m.out_features) for m in net.modules() if isinstance(m, torch.nn.Linear)}
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    return [e.input_shapes for e in prof.events()
            if e.name == "aten::bmm" and tuple(e.input_shapes[1][-2:]) in pairs]


@pytest.mark.parametrize("batch", [1, 2])
def test_slices_of_positions_reach_every_linear_as_one_matmul(tiny_base, batch):
    """Chunked loss, MLP tiles and attention tiles hand each linear a slice of positions; none of
    them may turn into a batched matmul over a broadcast weight."""
    from pi_lora import loss

    recipe = Recipe.model_validate({"model": {"base": str(tiny_base), "quant": "none", "compute_dtype": "fp32"},
                                    "lora": {"rank": 4, "target_modules": "all-linear"},
                                    "train": {"mlp_tile": 16, "attention_tile": 16, "loss_chunk": 16}})
    on = torch.device("cpu")
    net = model.build(recipe, model.load_config(str(tiny_base)), on, torch.float32,
                            plan.Settings.of(recipe, 4)).train()
    ids = torch.randint(0, 500, (batch, 40), generator=torch.Generator().manual_seed(5))
    step = loss.ChunkedLoss(net, 16)
    assert weight_matmuls(net, lambda: step(ids).backward()) == []
    # the oracle can fail: a slice of positions of a batch-1 tensor, as the chunks were handed over before
    head = loss.parts(net)[1]
    sliced = torch.randn(1, 40, head.in_features)[:, 8:24]
    assert weight_matmuls(net, lambda: head(sliced)) != []
