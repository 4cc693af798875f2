"""Data parallel training through torch.distributed, as launched by `torchrun` or `accelerate launch`.

Every rank holds the whole (4-bit) model and its own LoRA copy, reads its own share of the packed
sequences and computes gradients; the gradients of the trainable weights are averaged with one
all-reduce per optimizer step, so every rank applies the same update and the copies stay equal.
Rank 0 alone logs, shows progress and writes the run folder.

This is what DistributedDataParallel does, without its module wrapper: the chunked loss calls the
decoder and the head separately and runs two backward passes per micro-batch, which DDP's reducer
(bound to the wrapper's forward and one backward) does not allow. LoRA gradients are small, so one
flat all-reduce after the accumulation costs little.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def current() -> World:
    """This process's place, from the environment torchrun and accelerate set."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


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


def shard(batches: Iterator[torch.Tensor], world: World) -> Iterator[torch.Tensor]:
    """Rank r takes batches r, r + size, r + 2 size, ... of the global stream.

    So micro-batch a of a step on rank r is global batch a * size + r: two ranks with accumulation 1
    see exactly the batches one process with accumulation 2 sees, in the same steps.
    """
    return itertools.islice(batches, world.rank, None, world.size) if world.size > 1 else batches


def average(params: list[torch.Tensor], loss: float, world: World, grads: bool = True) -> float:
    """Average the gradients of `params` (unless FSDP did) and the loss over all ranks; returns the mean loss."""
    if world.size == 1:
        return loss
    if not grads:
        mean = torch.tensor([loss], device=params[0].device)
        torch.distributed.all_reduce(mean)
        return float(mean) / world.size
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([loss], device=grads[0].device)])
    torch.distributed.all_reduce(flat)
    flat /= world.size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n
    return float(flat[-1])


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


def shard_model(net) -> None:
    """Shard a (4-bit, LoRA) causal LM over the ranks with FSDP2: every decoder layer is a unit, then
    the decoder (embeddings, final norm) and the head. No unit wraps the whole model: the chunked loss
    calls the decoder and the head separately, so a root unit's forward would never run and its
    parameters never be gathered. FSDP averages the gradients (reduce-scatter) itself.

    bitsandbytes keeps each 4-bit weight's quantization state on its module, so the packed bytes
    (uint8, bnb's default storage) are sharded and gathered as plain tensors. FSDP1 would need them
    in the float dtype of the rest of the unit (bnb_4bit_quant_storage); FSDP2 does not.
    """
    from torch.distributed.fsdp import fully_shard

    from .loss import parts

    decoder, head = parts(net)
    for layer in decoder.layers:
        fully_shard(layer)
    fully_shard(decoder)
    fully_shard(head)


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
