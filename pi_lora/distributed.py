"""Data parallel training through torch.distributed, as launched by `torchrun` or `accelerate launch`.

Every rank holds the whole (4-bit) model and its own LoRA copy, reads its own share of the packed
sequences and computes gradients. The loss module (pi_lora.loss.ChunkedLoss: one forward, one
backward) is wrapped in torch's DistributedDataParallel, which averages the gradients of the
trainable weights in the last micro-batch's backward; sharded runs make it FSDP2's root unit.
Rank 0 alone logs, shows progress and writes the run folder.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import torch

from .world import World, current  # noqa: F401  (distributed.current, as every caller says it)


def start() -> World:
    """Join the process group when launched on several processes (NCCL on GPUs, gloo on CPUs)."""
    world = current()
    if world.size > 1 and not torch.distributed.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(world.local_rank)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return world


def stop() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def share(batches: Iterator[torch.Tensor], world: World) -> Iterator[torch.Tensor]:
    """Rank r takes batches r, r + size, r + 2 size, ... of the global stream.

    So micro-batch a of a step on rank r is global batch a * size + r: two ranks with accumulation 1
    see exactly the batches one process with accumulation 2 sees, in the same steps.
    """
    return itertools.islice(batches, world.rank, None, world.size) if world.size > 1 else batches


def mean(value: float, world: World) -> float:
    """The mean over all ranks of a number each rank computed (the logged loss)."""
    if world.size == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(total)
    return float(total) / world.size


def data_parallel(module: torch.nn.Module, on: torch.device) -> torch.nn.Module:
    """`module` under DistributedDataParallel. Gradients are views into DDP's buckets (no second copy).
    No broadcast at start: every rank built the same weights from the same seed, and the frozen 4-bit
    weights need none."""
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[on.index] if on.type == "cuda" else None, gradient_as_bucket_view=True, init_sync=False,
    )


def zero_grad(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Clear the gradients for the next step. Under DDP they are views into its buckets (after the
    first step) and are zeroed in place, so they stay views: set to None, the next backward would
    allocate them anew beside the buckets, the whole trainable gradient twice while micro-batches
    accumulate under no_sync. Elsewhere they are set to None (nothing holds them between steps)."""
    optimizer.zero_grad(set_to_none=not isinstance(model, torch.nn.parallel.DistributedDataParallel))


def gather(value, world: World) -> list:
    """Every rank's `value` (a picklable object), in rank order."""
    if world.size == 1:
        return [value]
    out = [None] * world.size
    torch.distributed.all_gather_object(out, value)
    return out


def barrier(world: World) -> None:
    if world.size > 1:
        torch.distributed.barrier()


def shard_model(root) -> None:
    """Shard the loss module of a (4-bit, LoRA) causal LM over the ranks with FSDP2, as torch documents
    it: every decoder layer is a unit, the loss module the root (embeddings, final norm and head; a
    root's parameters stay gathered from its forward through its backward). FSDP averages the
    gradients (reduce-scatter) itself.

    bitsandbytes keeps each 4-bit weight's quantization state on its module, so the packed bytes
    (uint8, bnb's default storage) are sharded and gathered as plain tensors. FSDP1 would need them
    in the float dtype of the rest of the unit (bnb_4bit_quant_storage); FSDP2 does not.
    """
    from torch.distributed.fsdp import fully_shard

    from .loss import parts

    decoder, _ = parts(root.net)
    for layer in decoder.layers:
        fully_shard(layer)
    fully_shard(root)


def is_sharded(net) -> bool:
    return any(hasattr(p, "full_tensor") for p in net.parameters())


def full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors on the CPU from FSDP shards (a collective: every rank calls it); others as they are."""
    return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu() for n, t in tensors.items()}


def full_optimizer_state(net, optimizer) -> dict:
    """The optimizer state of a sharded model, whole and keyed by parameter name (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(net, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full(net, optimizer, weights: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """Put whole weights and optimizer state (as `full` and `full_optimizer_state` give them) back into shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.tensor import distribute_tensor

    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            p = params[name]
            p.copy_(distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements))
    set_optimizer_state_dict(net, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
