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


def average(params: list[torch.Tensor], loss: float, world: World) -> float:
    """Average the gradients of `params` and the loss over all ranks; returns the mean loss."""
    if world.size == 1:
        return loss
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
