"""Memory techniques for long sequences that keep the numbers exactly the same.

Tiled MLP: a LLaMA MLP's intermediates (gate, up and their product: 3 x L x intermediate_size)
dominate a layer's recompute working set at long L. Running the MLP over tiles of the sequence,
each tile under non-reentrant checkpointing, keeps those intermediates for one tile at a time in
forward and in backward. The MLP is position-wise, so tiling changes nothing but memory.
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
