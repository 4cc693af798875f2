"""Memory techniques for long sequences.

Tiled MLP: a LLaMA MLP's intermediates (gate, up and their product: 3 x L x intermediate_size)
dominate a layer's recompute working set at long L. Running the MLP over tiles of the sequence,
each tile under non-reentrant checkpointing, keeps those intermediates for one tile at a time in
forward and in backward. The MLP is position-wise, so tiling changes nothing but memory.

Narrow (16-bit compute only): frozen embeddings and head in the compute dtype, and a residual
stream in the compute dtype too, as plain bf16 training has it; halves the checkpointed layer inputs.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def tiled(forward, tile: int):
    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] <= tile:
            return forward(x)
        return torch.cat(
            [checkpoint(forward, x[:, i : i + tile], use_reentrant=False) for i in range(0, x.shape[1], tile)],
            dim=1,
        )

    return run


def tile_mlps(model, tile: int) -> int:
    """Run every decoder layer's MLP in sequence tiles of `tile` positions; returns how many.

    Sets the forward of our own model's MLP instances (module names and weights are unchanged, so
    adapters and checkpoints are unaffected); no library code is modified.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = inner.model.layers
    for layer in layers:
        layer.mlp.forward = tiled(layer.mlp.forward, tile)
    return len(layers)


def narrow(model, dtype: torch.dtype) -> int:
    """Keep the frozen embeddings and LM head, and the residual stream, in the 16-bit compute dtype.

    peft's k-bit preparation upcasts every weight that is not 4-bit to fp32. For the frozen
    embeddings and head that doubles their memory for nothing: autocast casts the head back to
    16 bits for every matmul, and an embedding lookup of a 16-bit weight is exact. It also makes the
    embedding output fp32, and with it the residual stream and every checkpointed layer input,
    twice the memory of a 16-bit residual as plain bf16 training keeps it. Norm weights stay fp32
    (they are tiny). Returns the bytes saved in weights. Nothing changes when `dtype` is fp32.
    """
    if dtype == torch.float32:
        return 0
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved, seen = 0, set()
    for module in (inner.get_input_embeddings(), inner.get_output_embeddings()):
        for param in module.parameters():
            if param.requires_grad or param.dtype != torch.float32 or id(param) in seen:
                continue
            seen.add(id(param))
            saved += param.numel() * (4 - dtype.itemsize)
            param.data = param.data.to(dtype)
    # fp32 norm weights make fp32 norm outputs, and bitsandbytes returns its input's dtype, so the
    # MLP intermediates and the residual stream would be fp32. Every consumer of a norm output is a
    # matmul that autocast or bitsandbytes casts to the compute dtype anyway, so casting the output
    # once is the same arithmetic with half the memory.
    def cast(module, args, out):
        return out.to(dtype) if torch.is_tensor(out) else (out[0].to(dtype), *out[1:])

    norm_type = type(inner.model.norm)
    norms = [module for module in inner.modules() if type(module) is norm_type]
    for module in [inner.get_input_embeddings(), *inner.model.layers, *norms]:
        module.register_forward_hook(cast)
    return saved
