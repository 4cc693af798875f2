"""This process's place among the ranks torchrun or accelerate launched, read from their environment.

Apart from pi_lora.distributed (which re-exports it) so that reading it imports no torch: the CLI's
one-line messages ask it even when a Ctrl-C stopped torch's import half-way, and a second import of
a half-imported torch fails."""

from __future__ import annotations

import os
from dataclasses import dataclass


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
