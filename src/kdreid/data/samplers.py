"""P×K batches: P groups (identities, tracklets or pseudo-labels) with K images each.

The batch-hard triplet loss and D-MMD need several images of each group in every batch. Each epoch shuffles
every group's images into chunks of K: a last chunk short of K is completed with other images of the group, so
that no chunk holds an image twice; only a group of fewer than K images repeats some, drawn with replacement as
torchreid's RandomIdentitySampler does (D-MMD counts two copies as a within-class pair, as the original code did,
unless `adapt --dmmd-copies exclude`). Batches take P distinct groups, picked uniformly among those with chunks
left. The number of batches is fixed in advance, (all chunks) // P; when fewer than P groups have chunks left, the
emptied groups get a fresh chunk of K different images. So large groups may keep unvisited chunks at the end of an
epoch — torchreid's sampler, whose epoch ends as soon as fewer than P identities have chunks left, leaves them too.

Randomness comes from a generator seeded by (seed, epoch) only, so an epoch's batches are the same after a
resume and the same on every rank. In a distributed run `batch_size` is the global batch: each of the
world_size ranks takes its share of every batch, P/world_size whole groups (D-MMD's within/between split and
the triplet's positives need all K images of a group on one rank), so the ranks together see exactly the
batches of a one-process run.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np

from kdreid.errors import ConfigError, DatasetError


class PKSampler:
    """Yields lists of (P / world_size)×K indices into `labels`, this rank's share of each global P×K batch (all of
    it in a one-process run). `len()` is the number of batches per epoch, the same on every rank."""

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int,
        num_instances: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        what: str = "identities",
    ):
        if num_instances < 1 or batch_size % num_instances:
            raise DatasetError(
                f"batch size {batch_size} is not a multiple of --num-instances {num_instances}; choose P×K"
            )
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_instances = num_instances
        self.groups_per_batch = batch_size // num_instances
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        members: dict[int, list[int]] = defaultdict(list)
        for index, label in enumerate(self.labels.tolist()):
            members[label].append(index)
        self.members = {label: np.asarray(indices) for label, indices in sorted(members.items())}
        if len(self.members) < self.groups_per_batch:
            raise DatasetError(
                f"a batch of P={self.groups_per_batch} {what} needs at least that many, but the data have "
                f"{len(self.members)}; lower --batch-size or raise --num-instances"
            )
        self.groups_per_rank = groups_per_rank(self.groups_per_batch, world_size, what)
        self._num_batches = self._count_batches()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _count_batches(self) -> int:
        # Every group gives ceil(n / K) chunks of K; an epoch is (all chunks) // P batches, fixed in advance so
        # that schedules and progress bars do not depend on the shuffle.
        chunks = sum(max(1, -(-len(m) // self.num_instances)) for m in self.members.values())
        return chunks // self.groups_per_batch

    def _epoch_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, 0x504B])  # 'PK'
        chunks: dict[int, list[np.ndarray]] = {}
        for label, indices in self.members.items():
            indices = rng.permutation(indices)
            shortfall = -len(indices) % self.num_instances
            if shortfall:
                whole = len(indices) - (self.num_instances - shortfall)  # images before the short last chunk
                if whole:  # complete it with images of the earlier chunks: K different images
                    extra = rng.choice(indices[:whole], size=shortfall, replace=False)
                else:  # a group smaller than K: repeats are unavoidable
                    extra = rng.choice(indices, size=shortfall, replace=True)
                indices = np.concatenate([indices, extra])
            chunks[label] = list(indices.reshape(-1, self.num_instances))
        labels = list(chunks)
        batches: list[list[int]] = []
        while len(batches) < self._num_batches:
            available = [label for label in labels if chunks[label]]
            if len(available) < self.groups_per_batch:
                # Large groups outlast the rest; give the emptied ones a fresh chunk so that every epoch has
                # the same number of batches of P distinct groups.
                for label in labels:
                    if not chunks[label]:
                        chunks[label] = [self._fresh_chunk(self.members[label], rng)]
                available = labels
            picked = rng.choice(len(available), size=self.groups_per_batch, replace=False)
            batches.append([int(i) for j in picked for i in chunks[available[j]].pop()])
        return batches

    def _fresh_chunk(self, members: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """K images of one group for a refill: K different ones, or, from a group of fewer, each of its images once
        and the fewest repeats (as its chunks in the epoch's first pass are made)."""
        if len(members) >= self.num_instances:
            return rng.choice(members, size=self.num_instances, replace=False)
        return np.concatenate([rng.permutation(members),
                               rng.choice(members, size=self.num_instances - len(members), replace=True)])

    def __iter__(self) -> Iterator[list[int]]:
        # A batch lists its groups one after the other, K indices each: this rank's groups are one slice.
        share = self.groups_per_rank * self.num_instances
        return iter(batch[self.rank * share : (self.rank + 1) * share] for batch in self._epoch_batches())

    def __len__(self) -> int:
        return self._num_batches


def groups_per_rank(groups_per_batch: int, world_size: int, what: str = "identities") -> int:
    """P / world_size, the whole groups of a global P×K batch that each rank trains on; a P that the ranks
    cannot share equally is refused."""
    if world_size < 1 or groups_per_batch % world_size:
        raise ConfigError(
            f"a batch of P={groups_per_batch} {what} cannot be shared by {world_size} processes, each taking whole "
            f"{what}; choose --batch-size / --num-instances divisible by {world_size}"
        )
    return groups_per_batch // world_size
