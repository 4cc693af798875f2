"""The causal-LM loss without full-length logits, as one module with one backward.

At 32k tokens and a 128k vocabulary the logits alone are 16 GiB in fp32, and their gradient as
much again. Here the decoder runs once; the LM head and cross-entropy then run over chunks of
positions, each chunk under activation checkpointing: its logits are freed as soon as its loss is
known and recomputed in the backward, one chunk at a time (the recompute is 2·L·d·V FLOPs, under 1%
of a 7B step). The result is one autograd graph with one backward, so the module can be wrapped in
torch's DistributedDataParallel or be FSDP2's root unit like any model. Values and gradients equal
the plain computation.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint


def parts(net):
    """The decoder stack and the LM head of a (possibly peft-wrapped) causal LM."""
    inner = net.get_base_model() if hasattr(net, "get_base_model") else net
    return inner.model, inner.lm_head


def _head_loss(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # a chunk is a slice of positions: as (positions, hidden) rows the head's matmul is one mm, with
    # no copy of its weight (see memory.foldable)
    logits = head(hidden.reshape(-1, hidden.shape[-1])).float()
    # the head may sit on another GPU than the ids
    return torch.nn.functional.cross_entropy(logits, targets.flatten().to(logits.device), reduction="sum")


class ChunkedLoss(torch.nn.Module):
    """A causal LM whose forward returns its mean next-token loss on `ids` (no padding).

    `chunk` positions of the head at a time (0: the model's own loss on full logits). `offload`
    keeps what the decoder's forward saves for backward in (pinned) CPU memory: with non-reentrant
    checkpointing that is the layer inputs; the recompute in backward runs outside this context, so
    each layer's working set stays on the accelerator.
    """

    def __init__(self, net, chunk: int = 4096, offload: bool = False):
        super().__init__()
        self.net, self.chunk, self.offload = net, chunk, offload

    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`position_ids`: short-window training's (pi_lora.pose); None: 0..n-1."""
        inputs = {"input_ids": ids}
        if position_ids is not None:
            # transformers reads a jump in position ids without an attention mask as the start of
            # another packed document and masks attention across it; a mask of ones keeps one causal
            # sequence (SDPA still takes its is_causal path: no L x L mask is made)
            inputs.update(position_ids=position_ids, attention_mask=torch.ones_like(ids))
        if not self.chunk:
            return self.net(**inputs, labels=ids).loss
        decoder, head = parts(self.net)
        pinned = torch.cuda.is_available()
        keep = torch.autograd.graph.save_on_cpu(pin_memory=pinned) if self.offload else contextlib.nullcontext()
        with keep:
            hidden = decoder(**inputs).last_hidden_state
        targets = ids[:, 1:]
        total = 0.0
        for i in range(0, targets.shape[1], self.chunk):
            piece = hidden[:, i : i + self.chunk][:, : targets.shape[1] - i]
            total = total + checkpoint(_head_loss, head, piece, targets[:, i : i + self.chunk], use_reentrant=False)
        return total / targets.numel()


def backward(net, ids: torch.Tensor, scale: float = 1.0, chunk: int = 4096,
             autocast=contextlib.nullcontext, offload: bool = False,
             position_ids: torch.Tensor | None = None) -> float:
    """Mean next-token loss of `ids`; backpropagates `scale` x loss. `autocast` wraps the forward
    only (the recompute in backward restores it). Returns the loss."""
    with autocast():
        value = ChunkedLoss(net, chunk, offload)(ids, position_ids)
    (value * scale).backward()
    return value.item()
