import collections

import pytest
import torch

from kdreid.data.augment import AugmentConfig
from kdreid.data.datasets.base import ImageRecord, ReidDataset
from kdreid.errors import DatasetError
from kdreid.stages.data import BatchSource, combine_train, hold_out_validation


def _records(num_pids=10, cams=(1, 2, 3), per_cam=2):
    return [
        ImageRecord(f"p{p}_c{c}_{i}.jpg", p, c, p * 10 + c)
        for p in range(num_pids) for c in cams for i in range(per_cam)
    ]


def test_combine_train_offsets_labels_per_dataset():
    a = ReidDataset("a", "", _records(3), [], [])
    b = ReidDataset("b", "", _records(2), [ImageRecord("q.jpg", 7, 1)], [ImageRecord("g.jpg", 7, 2),
                                                                           ImageRecord("d.jpg", 0, 2)])
    combined = combine_train([a, b])
    assert sorted({r.pid for r in combined}) == [0, 1, 2, 3, 4]
    assert len({r.tracklet for r in combined}) == 3 * 3 + 2 * 3
    assert combined[-1].path.startswith("p1") and combined[-1].pid == 4
    everything = combine_train([a, b], combineall=True)
    assert max(r.pid for r in everything) == 5  # pid 7 of b's test split joins as one new id; distractor 0 not
    assert "d.jpg" not in {r.path for r in everything}


def test_hold_out_validation_is_disjoint_and_market_shaped():
    records = _records(num_pids=20)
    split = hold_out_validation(records, 0.2, seed=0)
    held = {r.pid for r in split.query}
    assert len(held) == 4 and 0 not in held
    assert sorted({r.pid for r in split.train}) == list(range(16))
    assert len(split.train) + len(split.query) + len(split.gallery) == len(records)
    assert collections.Counter((r.pid, r.camid) for r in split.query) == {(p, c): 1 for p in held for c in (1, 2, 3)}
    assert hold_out_validation(records, 0.2, seed=0) == split
    with pytest.raises(DatasetError, match="cannot hold out"):
        hold_out_validation(_records(num_pids=3), 0.1, seed=0)


def test_batch_source_draws_pk_batches_of_augmented_images():
    records = _records(num_pids=6, per_cam=1)
    images = torch.arange(len(records), dtype=torch.uint8)[:, None, None, None].expand(-1, 3, 8, 4).contiguous()
    source = BatchSource(records, [r.pid for r in records], height=8, width=4, batch_size=6, num_instances=3,
                         augment=AugmentConfig(flip=0, pad=0, erase=0), device=torch.device("cpu"), seed=0,
                         images=images)
    source.start_epoch(0)
    for _ in range(len(source) + 2):  # wraps around past the end of the epoch
        batch, labels = source.next_batch(torch.Generator().manual_seed(0))
        assert batch.shape == (6, 3, 8, 4) and labels.tolist()[0:3] == [labels[0].item()] * 3
        index = (batch[:, 0, 0, 0] * 255).round().long()
        assert [records[i].pid for i in index.tolist()] == labels.tolist()
        assert source.last_index.tolist() == index.tolist()  # the batch's positions, for per-image fields
    source.set_labels([-1] * 9 + [r.pid for r in records[9:]], batch_size=6, num_instances=3, seed=0, what="ids")
    source.start_epoch(0)
    batch, labels = source.next_batch(torch.Generator().manual_seed(0))
    assert (labels >= 3).all()  # outliers (-1) are never drawn
