"""Memory for long sequences: the techniques that save it, and the readings of what a step used.

Tiled MLP: a LLaMA MLP's intermediates (gate, up and their product: 3 x L x intermediate_size)
dominate a layer's recompute working set at long L. Running the MLP over tiles of the sequence,
each tile under non-reentrant checkpointing, keeps those intermediates for one tile at a time in
forward and in backward. The MLP is position-wise, so tiling changes nothing but memory.

Tiled attention block: what is left per token with the MLP tiled and the checkpoints offloaded is
the attention block's working set: the fp32 internals of the two RMSNorms, the inputs and outputs
of q/k/v/o (and their LoRA), q and k before and after RoPE, and their gradients. Everything in the
block but the attention core is position-wise too, so it runs over sequence tiles, each under
non-reentrant checkpointing: the input norm with q/k/v and RoPE; the o projection with the
residual add and the post-attention norm. Only q, k, v, the attention output, the residual and the
normed residual of the whole sequence live at once; the attention core stays one SDPA call over the
whole sequence (it never builds an L x L tensor).

Narrow (16-bit compute only): frozen embeddings and head in the compute dtype, and a residual
stream in the compute dtype too, as plain bf16 training has it; halves the checkpointed layer inputs.
"""

from __future__ import annotations

import resource

import torch
from torch.utils.checkpoint import checkpoint


def foldable(x: torch.Tensor) -> torch.Tensor:
    """`x`, a slice of positions, laid out so that torch.matmul runs one matrix multiply on it.

    A slice x[:, i:j] of a batch-1 (1, T, d) tensor is contiguous, but keeps the batch stride of the
    whole sequence, and torch.matmul (2.13) folds a 3-D input into an mm only when its strides say
    the leading dims are packed; otherwise it broadcasts the weight into a batched matmul, which on
    CPU copies the whole (transposed) weight for every call (measured: 1 GiB and 5 s per chunk for a
    128k-vocabulary LM head, against 0.3 s) and on a GPU is many times slower (pytorch/pytorch#186148).
    A batch of one is re-viewed with packed strides at no cost; a larger batch's slice is copied, an
    activation tile far smaller than any weight. Call it inside the checkpointed function, so that
    what the checkpoint keeps stays a view.
    """
    return x[0].unsqueeze(0) if x.shape[0] == 1 else x.contiguous()


def tiled(forward, tile: int):
    def one(x: torch.Tensor) -> torch.Tensor:
        return forward(foldable(x))

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] <= tile:
            return forward(x)
        return torch.cat(
            [checkpoint(one, x[:, i : i + tile], use_reentrant=False) for i in range(0, x.shape[1], tile)],
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


def tile_attention(model, tile: int) -> int:
    """Run every decoder layer's attention block in sequence tiles of `tile` positions; returns how many.

    Sets the forward of our own model's decoder-layer instances, as tile_mlps does (module names and
    weights are unchanged; no library code is modified). Hand-written because no library tiles the
    attention block: the layer's forward is one function in transformers, so the tiles have to cut
    it where LlamaDecoderLayer/LlamaAttention (transformers 5) compose it, and this function mirrors
    their forwards, calling the same submodules, RoPE and attention interface.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = inner.model.layers
    attn = layers[0].self_attn
    if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) or hasattr(attn, "q_norm"):
        from .errors import PiLoraError

        raise PiLoraError(f"train.attention_tile supports LLaMA-layout attention, not {type(attn).__name__}; "
                          "set train.attention_tile 0.")
    for layer in layers:
        layer.forward = _tiled_layer(layer, type(layer).forward.__get__(layer), tile)
    return len(layers)


def _tiled_layer(layer, untiled, tile: int):
    from functools import partial

    from transformers.models.llama.modeling_llama import (ALL_ATTENTION_FUNCTIONS, apply_rotary_pos_emb,
                                                          eager_attention_forward)

    attn = layer.self_attn
    rope = getattr(attn, "apply_rotary_pos_emb", apply_rotary_pos_emb)  # train.kernels may have set one

    def qkv(x, cos, sin):  # position-wise up to the attention core
        x = layer.input_layernorm(x)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = rope(q, k, cos, sin)
        return q, k, v

    def out(o, residual):  # position-wise after it: o_proj, the residual add, the post-attention norm
        h = residual + attn.o_proj(o)
        return h, layer.post_attention_layernorm(h)

    def pieces(fn, *xs):
        """fn over tiles of positions (dim 1 of every x), each tile checkpointed; outputs concatenated."""
        n = xs[0].shape[1]
        if n <= tile:
            return fn(*xs)
        def one(*ts):
            return fn(*map(foldable, ts))

        outs = [checkpoint(one, *(x[:, i : i + tile] for x in xs), use_reentrant=False) for i in range(0, n, tile)]
        return tuple(torch.cat(parts, dim=dim) for parts, dim in zip(zip(*outs), dims(outs[0])))

    def dims(first):  # q/k/v are (batch, heads, positions, head_dim); the rest (batch, positions, ...)
        return [2 if t.dim() == 4 else 1 for t in first]

    def body(hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        for unused in ("position_ids", "use_cache", "cache"):  # RoPE comes in position_embeddings; no cache
            kwargs.pop(unused, None)
        cos, sin = position_embeddings
        q, k, v = pieces(qkv, hidden_states, cos, sin)
        window = getattr(attn.config, "sliding_window", None)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
        o, _ = interface(attn, q, k, v, attention_mask, dropout=attn.attention_dropout if attn.training else 0.0,
                         scaling=attn.scaling, **({"sliding_window": window} if window else {}), **kwargs)
        o = o.reshape(*hidden_states.shape[:-1], -1).contiguous()
        h, normed = pieces(out, o, hidden_states)
        return h + layer.mlp(normed)

    def forward(hidden_states, *args, **kwargs):
        if args or kwargs.get("cache") is not None:  # generation with a cache: the library's own forward
            return untiled(hidden_states, *args, **kwargs)
        # the class forward, which this instance forward replaces, is where transformers'
        # GradientCheckpointingLayer checkpoints a layer: keep that, per layer, as it decides
        if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
            return layer._gradient_checkpointing_func(partial(body, **kwargs), hidden_states)
        return body(hidden_states, **kwargs)

    return forward


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


def peak_gib(on: torch.device) -> float:
    """Peak allocated on the busiest GPU of this process (several when the layers are split); on a
    CPU, the process's peak resident memory."""
    if on.type == "cuda":
        return max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def resident_gib() -> float:
    """The process's resident memory now."""
    import psutil

    return psutil.Process().memory_info().rss / 2**30
