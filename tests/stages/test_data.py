import collections

import pytest
import torch

from kdreid.data.augment import AugmentConfig
from kdreid.data.datasets.base import ImageRecord, ReidDataset
from kdreid.errors import DatasetError
from kdreid.stages.data import BatchSource, check_room_for_cache, combine_train, hold_out_validation


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


def _named_records(prefix, num_pids, cams=(1, 2, 3), per_cam=2):
    return [ImageRecord(f"{prefix}/{r.path}", r.pid, r.camid, r.tracklet) for r in _records(num_pids, cams, per_cam)]


def test_three_sources_get_disjoint_label_ranges():
    """A review: with two sources an offset taken from the last dataset alone equals the running one; `-s a b c`
    would then give c the labels of b. Reference: each source's (raw pid) and (raw tracklet) map to labels of its
    own, the pids together 0..N-1."""
    sources = [ReidDataset(name, "", _named_records(name, n), [], []) for name, n in (("a", 3), ("b", 2), ("c", 4))]
    combined = combine_train(sources)
    originals = [(d.name, r) for d in sources for r in d.train]
    assert [r.path for r in combined] == [r.path for _, r in originals]
    assert sorted({r.pid for r in combined}) == list(range(3 + 2 + 4))
    for field in ("pid", "tracklet"):
        label_of = {}  # (source, raw label) -> combined label: one each, no two sharing one
        for (name, raw), new in zip(originals, combined):
            assert label_of.setdefault((name, getattr(raw, field)), getattr(new, field)) == getattr(new, field)
        assert len(set(label_of.values())) == len(label_of) == sum(len({getattr(r, field) for r in d.train})
                                                                   for d in sources)


def test_combineall_test_identities_get_new_per_camera_tracklets():
    """--combineall: a test identity's images are one new id, one tracklet per (identity, camera) that no training
    tracklet has; an image both in query and gallery (classic CUHK03) once; MSMT17's pid 0 is a person."""
    train = _named_records("t", 3)
    query = [ImageRecord("q1.jpg", 7, 1), ImageRecord("both.jpg", 9, 2)]
    gallery = [ImageRecord("g1.jpg", 7, 2), ImageRecord("g2.jpg", 7, 2), ImageRecord("g3.jpg", 7, 1),
               ImageRecord("both.jpg", 9, 2), ImageRecord("g4.jpg", 9, 3), ImageRecord("z.jpg", 0, 1),
               ImageRecord("z2.jpg", 0, 2)]
    everything = combine_train([ReidDataset("market1501", "", train, query, gallery)], combineall=True)
    assert [r.path for r in everything].count("both.jpg") == 1
    added = {r.path: r for r in everything[len(train):]}
    assert set(added) == {"q1.jpg", "both.jpg", "g1.jpg", "g2.jpg", "g3.jpg", "g4.jpg"}  # distractors left out
    assert {r.tracklet for r in train}.isdisjoint(r.tracklet for r in added.values())
    assert {r.pid for r in train}.isdisjoint(r.pid for r in added.values())
    by_pair = collections.defaultdict(set)
    for r in added.values():
        by_pair[(r.pid, r.camid)].add(r.tracklet)
    assert all(len(tracklets) == 1 for tracklets in by_pair.values())
    assert len({t for tracklets in by_pair.values() for t in tracklets}) == len(by_pair) == 4
    msmt = combine_train([ReidDataset("msmt17", "", train, [ImageRecord("q0.jpg", 0, 1)],
                                      [ImageRecord("g0.jpg", 0, 2)])], combineall=True)
    assert {r.path for r in msmt[len(train):]} == {"q0.jpg", "g0.jpg"}  # a real identity, kept


def test_source_validation_holds_out_only_identities_with_a_match_in_another_camera():
    """--select source-val: a held-out identity has a gallery image in another camera for every query (one seen by
    one camera alone would be a query without a match); the fraction counts every identity; the split needs two."""
    for seed in range(5):
        records = _records(num_pids=20) + _records(num_pids=30, cams=(4,))[20 * 2:]  # ids 20..29 in camera 4 only
        split = hold_out_validation(records, 0.2, seed=seed)
        held = {r.pid - 1 for r in split.query}
        assert len(held) == round(0.2 * 30) and held <= set(range(20))
        assert {r.path for r in split.train}.isdisjoint(r.path for r in split.query + split.gallery)
        assert {r.path for r in records if r.pid in held} == {r.path for r in split.query + split.gallery}
        for q in split.query:
            assert any(g.pid == q.pid and g.camid != q.camid for g in split.gallery)
    with pytest.raises(DatasetError, match="cannot hold out"):
        hold_out_validation(_records(num_pids=10), 0.1, seed=0)  # a single identity: no validation


def test_batch_source_draws_every_identity_label_zero_included():
    records = _records(num_pids=4, per_cam=1)
    images = torch.zeros(len(records), 3, 8, 4, dtype=torch.uint8)
    source = BatchSource(records, [r.pid for r in records], height=8, width=4, batch_size=6, num_instances=3,
                         augment=AugmentConfig(flip=0, pad=0, erase=0), device=torch.device("cpu"), seed=0,
                         images=images)
    source.start_epoch(0)
    drawn = {label for _ in range(len(source)) for label in source.next_batch(torch.Generator())[1].tolist()}
    assert drawn == {0, 1, 2, 3}


def test_a_datasets_record_that_is_not_a_mapping_is_damaged(tmp_path):
    from kdreid.stages.data import read_datasets_record

    path = tmp_path / "datasets.json"
    assert read_datasets_record(path) == {}  # a run from before the record
    for text in ('["synth_msmt"]', '"abc"', "{", "null"):
        path.write_text(text)
        assert read_datasets_record(path) is None, text
    path.write_text('{"synth_msmt": "aaaa/bbbb"}')
    assert read_datasets_record(path) == {"synth_msmt": "aaaa/bbbb"}


def test_a_cache_too_large_for_the_ram_is_refused_in_one_line_before_decoding(monkeypatch):
    # Found by a review: the allocator's traceback (or the OOM killer halfway through decoding) instead.
    monkeypatch.setattr("kdreid.stages.data.free_memory", lambda device: 1_000_000)
    records = _records(num_pids=6, per_cam=1)  # files that do not exist: the check comes before any decoding
    with pytest.raises(DatasetError, match=r"cache needs 2\.4 MB \(18 images at 256x176, uint8\) but the host has "
                                           r"1\.0 MB available; train at a smaller --height/--width"):
        BatchSource(records, [r.pid for r in records], height=256, width=176, batch_size=6, num_instances=3,
                    augment=AugmentConfig(), device=torch.device("cpu"), seed=0)
    # where the free memory is unknown (no /proc/meminfo: macOS, Windows), no refusal: the check, not the training
    monkeypatch.setattr("kdreid.stages.data.free_memory", lambda device: None)
    check_room_for_cache(10**6, 256, 128)


def test_the_fingerprints_follow_the_splits_they_cover(tmp_path):
    # evaluate --out records the query and gallery's digest; a stage's datasets.json the whole dataset's and the
    # training split's: a query image replaced is another evaluation (and a stage evaluated again, not retrained).
    from kdreid.stages.data import dataset_fingerprint, evaluation_fingerprint

    splits = {split: [ImageRecord(str(tmp_path / f"{split}{i}.jpg"), i, 1 + i % 2, i) for i in range(3)]
              for split in ("train", "query", "gallery")}
    for records in splits.values():
        for record in records:
            (tmp_path / record.path).write_bytes(b"x" * 10)
    dataset = ReidDataset("d", str(tmp_path), splits["train"], splits["query"], splits["gallery"])

    def digests():
        whole, train = dataset_fingerprint(dataset, str(tmp_path)).split("/")
        return whole, train, evaluation_fingerprint(dataset, str(tmp_path))

    before = digests()
    for split, changed in (("query", (True, False, True)), ("gallery", (True, False, True)),
                           ("train", (True, True, False))):
        with open(splits[split][1].path, "ab") as handle:  # another file under the same name
            handle.write(b"y")
        after = digests()
        assert tuple(a != b for a, b in zip(after, before)) == changed, split
        before = after


def test_the_cache_room_is_for_every_process_of_the_machine(monkeypatch):
    # Found by a review: under torchrun each process decodes its own full cache at the same moment, and each
    # compared one copy with the memory free before any had taken its share: 8 processes x MSMT17's 3.2 GB passed
    # a check against 20 GB, then met the OOM killer.
    monkeypatch.setattr("kdreid.stages.data.free_memory", lambda device: 20 * 10**9)
    check_room_for_cache(32621, 256, 128)  # one process: 3.21 GB of 20
    for name, value in {"RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
                        "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DatasetError, match=r"cache needs 25\.65 GB \(32621 images at 256x128, uint8, one copy in each "
                                           r"of 8 processes\) but the host has 20\.00 GB available; .* or processes$"):
        check_room_for_cache(32621, 256, 128)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 16 processes on 4 machines: 12.8 GB here
    check_room_for_cache(32621, 256, 128)


def test_the_cache_goes_to_the_gpu_only_when_it_fits_beside_the_training(monkeypatch):
    # DESIGN §3: "in RAM, or on the GPU when it fits" (found by a review: moved to the GPU whatever its size).
    from kdreid.stages.data import cache_device

    monkeypatch.setattr("kdreid.stages.data.free_memory", lambda device: 10 * 2**30)
    cuda = torch.device("cuda")
    assert cache_device(2 * 2**30, cuda) == cuda
    assert cache_device(8 * 2**30, cuda).type == "cpu"
    assert cache_device(2**20, torch.device("cpu")).type == "cpu"
    monkeypatch.setattr("kdreid.stages.data.free_memory", lambda device: None)  # unknown: on the GPU, as before
    assert cache_device(8 * 2**30, cuda) == cuda
