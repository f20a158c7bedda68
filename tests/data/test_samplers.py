import collections

import numpy as np
import pytest

from kdreid.data.samplers import PKSampler
from kdreid.errors import ConfigError, DatasetError


def _labels():
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 15, size=20)  # includes groups smaller than K
    return [label for label, size in enumerate(sizes) for _ in range(size)]


def test_every_batch_is_p_distinct_groups_of_k():
    labels = _labels()
    sampler = PKSampler(labels, batch_size=16, num_instances=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        assert len(batch) == 16
        groups = [labels[i] for i in batch]
        counts = collections.Counter(groups)
        assert len(counts) == 4 and set(counts.values()) == {4}
        # K consecutive indices share a group: consumers may reshape to (P, K).
        assert all(len(set(groups[k : k + 4])) == 1 for k in range(0, 16, 4))


def test_epoch_covers_most_images_and_is_reproducible():
    labels = _labels()
    sampler = PKSampler(labels, batch_size=16, num_instances=4, seed=1)
    seen = {i for batch in sampler for i in batch}
    assert len(seen) >= 0.8 * len(labels)
    again = PKSampler(labels, batch_size=16, num_instances=4, seed=1)
    assert list(again) == list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != list(again)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_share_each_global_batch_by_whole_groups(world_size):
    labels = _labels()
    full = list(PKSampler(labels, 16, 4, seed=5))
    ranks = [list(PKSampler(labels, 16, 4, seed=5, rank=r, world_size=world_size)) for r in range(world_size)]
    # Every rank takes as many steps as one process; step i's shares, in rank order, are its global batch.
    assert all(len(shares) == len(full) for shares in ranks)
    for step, batch in enumerate(full):
        shares = [shares[step] for shares in ranks]
        assert [i for share in shares for i in share] == batch
        groups = [{labels[i] for i in share} for share in shares]
        assert all(len(share) == 16 // world_size and len(g) == 4 // world_size for share, g in zip(shares, groups))
        # No group is split between ranks: all K of its images are on one rank.
        assert sum(len(g) for g in groups) == len(set().union(*groups)) == 4


def test_a_p_the_ranks_cannot_share_is_refused():
    with pytest.raises(ConfigError, match="P=4 tracklets cannot be shared by 3 processes"):
        PKSampler(_labels(), 16, 4, world_size=3, what="tracklets")


def test_bad_sizes_are_clear():
    with pytest.raises(DatasetError, match="not a multiple of --num-instances 4"):
        PKSampler([0, 1], 10, 4)
    with pytest.raises(DatasetError, match="P=8 tracklets needs at least that many, but the data have 2"):
        PKSampler([0, 0, 1, 1], 32, 4, what="tracklets")


def test_no_chunk_repeats_an_image_unless_its_group_is_smaller_than_k():
    labels = _labels()
    sizes = collections.Counter(labels)
    for epoch in range(5):
        sampler = PKSampler(labels, batch_size=16, num_instances=4, seed=2)
        sampler.set_epoch(epoch)
        for batch in sampler:
            for k in range(0, 16, 4):
                chunk = batch[k : k + 4]
                if sizes[labels[chunk[0]]] >= 4:
                    assert len(set(chunk)) == 4, (epoch, chunk)
                else:
                    assert set(chunk) <= {i for i, label in enumerate(labels) if label == labels[chunk[0]]}


def test_refill_chunks_repeat_no_more_than_the_first_pass():
    """Found by a review: once large groups outlast the rest, the emptied groups are refilled; a refill drew all
    K images of a small group with replacement ([a, a, a, a] from three images), more copy pairs than needed."""
    labels = [0] * 40 + [1] * 3 + [2] * 2 + [3] * 5 + [4] * 3  # group 0 outlasts the rest: refills every epoch
    members = collections.defaultdict(set)
    for index, label in enumerate(labels):
        members[label].add(index)
    refills = 0
    for epoch in range(20):
        sampler = PKSampler(labels, batch_size=8, num_instances=4, seed=epoch)
        sampler.set_epoch(epoch)
        for batch in sampler:
            for k in range(0, 8, 4):
                chunk = batch[k : k + 4]
                group = members[labels[chunk[0]]]
                assert len(set(chunk)) == min(4, len(group)), (epoch, chunk)  # every image once before any repeat
                refills += labels[chunk[0]] != 0
    assert refills > 5 * 20  # the small groups came back many times: refills were exercised
