"""The causal-LM loss without full-length logits.

At 32k tokens and a 128k vocabulary the logits alone are 16 GiB in fp32, and their gradient as
much again. Here the decoder runs once; the LM head and cross-entropy then run over chunks of
positions, each chunk's backward done at once, and the gradient of the hidden states is sent back
through the decoder in one backward. Values and gradients equal the plain computation.
"""

from __future__ import annotations

import contextlib

import torch


def parts(net):
    """The decoder stack and the LM head of a (possibly peft-wrapped) causal LM."""
    inner = net.get_base_model() if hasattr(net, "get_base_model") else net
    return inner.model, inner.lm_head


def backward(net, ids: torch.Tensor, scale: float = 1.0, chunk: int = 4096,
             autocast=contextlib.nullcontext, offload: bool = False) -> float:
    """Mean next-token loss of `ids` (no padding); backpropagates `scale` x loss. Returns the loss.

    `autocast` wraps the forward computations only: backward passes do not run under autocast.
    `offload` keeps what the forward saves for backward in (pinned) CPU memory: with non-reentrant
    checkpointing that is the layer inputs; the recompute in backward runs outside this context, so
    each layer's working set stays on the accelerator.
    """
    decoder, head = parts(net)
    keep = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if offload else contextlib.nullcontext()
    with autocast(), keep:
        hidden = decoder(input_ids=ids).last_hidden_state
    detached = hidden.detach().requires_grad_(True)
    targets = ids[:, 1:]
    count = targets.numel()
    total = 0.0
    for i in range(0, targets.shape[1], chunk):
        with autocast():
            logits = head(detached[:, i : i + chunk][:, : targets.shape[1] - i]).float()
            loss = torch.nn.functional.cross_entropy(  # the head may sit on another GPU than the ids
                logits.flatten(0, 1), targets[:, i : i + chunk].flatten().to(logits.device), reduction="sum"
            )
        (loss * (scale / count)).backward()
        total += loss.item()
        del logits, loss  # else the last chunk's logits stay alive through the decoder's backward
    hidden.backward(detached.grad)
    return total / count


@torch.no_grad()
def value(net, ids: torch.Tensor, chunk: int = 4096, autocast=contextlib.nullcontext) -> float:
    """Mean next-token loss of `ids` with no gradients (validation), the head run in chunks as above."""
    decoder, head = parts(net)
    with autocast():
        hidden = decoder(input_ids=ids).last_hidden_state
    targets = ids[:, 1:]
    total, chunk = 0.0, chunk or targets.shape[1]
    for i in range(0, targets.shape[1], chunk):
        with autocast():
            logits = head(hidden[:, i : i + chunk][:, : targets.shape[1] - i]).float()
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets[:, i : i + chunk].flatten().to(logits.device), reduction="sum").item()
    return total / targets.numel()
