"""Short-window training: position ids that span `rope.target_len` on sequences of `rope.train_len`.

PoSE (Zhu et al. 2023, arXiv 2309.10400, section 3): a training sequence of L_c = train_len tokens
is cut into N = pose_chunks chunks; chunk i keeps consecutive positions shifted by a skip u_i, with
u_0 = 0 and u_i drawn uniformly from {u_(i-1), ..., L_t - L_c} (L_t = target_len), so positions rise
and the last one is at most L_t - 1. The model sees every relative distance up to L_t at the memory
and time of L_c. Where this differs from the paper:
- the chunk lengths come from N - 1 distinct cut points drawn uniformly over the sequence (every
  chunk holds at least one token); the paper's code draws the first of two chunks from at most half;
- the text stays continuous (the paper may also skip text between chunks, its v_i): sequences are
  packed from the token stream as at full length, so every token is trained on once per epoch.

No library does this for a packed stream with exact resume: the draw of sequence k depends only on
the run's seed and k (its index in the data), never on a generator's state, so a resumed run, and
every data-parallel rank, draws exactly what an uninterrupted single process draws.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .errors import PiLoraError

STREAM = 0x905E  # keeps these draws apart from the data order's (seeded by [seed, epoch])


def active(section) -> bool:
    """Whether the rope section asks for short windows."""
    return section.train_len is not None and section.train_len < section.target_len


def train_len(section) -> int:
    """The length of each trained sequence."""
    return section.train_len or section.target_len


def check(section, extends: bool) -> None:
    """rope.train_len and rope.pose_chunks against the run; `extends`: whether the rope setting takes
    the base past its own length (short windows of a run that extends nothing train nothing new)."""
    if section.train_len is None:
        return
    if section.train_len > section.target_len:
        raise PiLoraError(f"rope.train_len ({section.train_len:,}) is longer than rope.target_len "
                          f"({section.target_len:,}); it is the length of each trained window, at most the target.")
    if section.train_len < section.pose_chunks:
        raise PiLoraError(f"rope.train_len ({section.train_len}) is shorter than rope.pose_chunks "
                          f"({section.pose_chunks}): each chunk needs at least one token.")
    if active(section) and not extends:
        raise PiLoraError(f"rope.train_len {section.train_len:,} spreads positions up to rope.target_len "
                          f"{section.target_len:,}, but this run extends nothing (rope.scaling none at the base's "
                          "own length); leave rope.train_len unset.")


def positions(index: int, train_len: int, target_len: int, chunks: int, seed: int) -> np.ndarray:
    """The position ids of training sequence `index` (int64, length train_len)."""
    rng = np.random.default_rng([STREAM, seed, index])
    cuts = np.sort(rng.choice(np.arange(1, train_len), size=chunks - 1, replace=False))
    bounds = [0, *cuts.tolist(), train_len]
    ids = np.arange(train_len, dtype=np.int64)
    skip = 0
    for i in range(1, chunks):
        skip = int(rng.integers(skip, target_len - train_len, endpoint=True))
        ids[bounds[i]:bounds[i + 1]] += skip
    return ids


def batches(stream: Iterator[torch.Tensor], start: int, section, seed: int) -> Iterator:
    """`stream`'s batches (from global sequence `start` on), each as (ids, position ids) when the
    section asks for short windows; unchanged otherwise (positions 0..n-1, as the model makes them)."""
    if not active(section):
        yield from stream
        return
    index = start
    for ids in stream:
        rows = [positions(index + j, ids.shape[1], section.target_len, section.pose_chunks, seed)
                for j in range(ids.shape[0])]
        index += ids.shape[0]
        yield ids, torch.from_numpy(np.stack(rows))
