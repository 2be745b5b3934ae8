"""Step-indexed batch sampling: which samples (and augmentation seeds) a step sees depends only
on ``(seed, step)``, never on how many steps ran before in this process.

Global sample position ``p = step · global_batch + j`` reads element ``p mod N`` of the
permutation of epoch ``p div N`` (``default_rng([seed, epoch]).permutation(N)``), with the
augmentation seed ``SeedSequence([seed, p])``. Rank ``r`` of ``W`` takes
``j ∈ [r·B/W, (r+1)·B/W)``: the union over ranks is exactly the 1-rank batch, each sample with
the same augmentation. A resumed run restarts at ``start_step`` and sees what the
uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


def sample_seed(seed: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


class StepBatchSampler:
    """Yields, per step in ``[start_step, total_steps)``, this rank's list of ``(index, aug_seed)``."""

    def __init__(self, num_samples: int, global_batch: int, total_steps: int, seed: int = 0,
                 start_step: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if num_samples <= 0:
            raise ValueError("the dataset is empty")
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the world size {world_size}")
        self.n, self.global_batch, self.total, self.seed = num_samples, global_batch, total_steps, seed
        self.start, self.rank, self.world, self.shuffle = start_step, rank, world_size, shuffle
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                          else np.arange(self.n))
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int) -> list:
        local = self.global_batch // self.world
        out = []
        for j in range(self.rank * local, (self.rank + 1) * local):
            p = step * self.global_batch + j
            epoch, k = divmod(p, self.n)
            out.append((int(self._permutation(epoch)[k]), sample_seed(self.seed, p)))
        return out

    def __iter__(self) -> Iterator[list]:
        for step in range(self.start, self.total):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.total - self.start)


class ShardedEvalSampler:
    """Sequential evaluation batches over this rank's shard ``range(rank, N, world)`` (no padding)."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, num_samples, world_size))
        self.batch_size = batch_size

    def __iter__(self):
        for i in range(0, len(self.indices), self.batch_size):
            yield self.indices[i:i + self.batch_size]

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size
