"""Each layout reader on a tiny tree written in that layout: the parsed records are checked exactly, and against
torchreid's own parsing where torchreid reads the same layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdreid.data.datasets import ImageRecord, build_dataset, dataset_names
from kdreid.errors import DatasetError
from tests.data.layouts import (
    DUKE_NAMES,
    MARKET_NAMES,
    MSMT_LISTS,
    duke_tree,
    market_tree,
    msmt_tree,
    torchreid_reader,
    write_csv,
    write_images,
)


def records(folder: Path, rows: list[tuple]) -> list[ImageRecord]:
    return [ImageRecord(str(folder / name), *values) for name, *values in rows]


# ---------------------------------------------------------------------------------------------- Market-1501
def expected_market(data_dir: Path) -> dict[str, list[ImageRecord]]:
    return {
        # raw pids 2, 7, 10 -> 0, 1, 2; tracklets = (raw pid, camera) pairs in sorted order
        "train": records(data_dir / "bounding_box_train", [
            ("0002_c1s1_000451_03.jpg", 0, 1, 0),
            ("0002_c2s1_000301_01.jpg", 0, 2, 1),
            ("0007_c1s1_000101_01.jpg", 1, 1, 2),
            ("0007_c1s1_000151_02.jpg", 1, 1, 2),
            ("0010_c12s3_000001_01.jpg", 2, 12, 3),
        ]),
        "query": records(data_dir / "query", [
            ("0002_c3s1_000001_01.jpg", 2, 3, -1), ("0007_c2s1_000001_01.jpg", 7, 2, -1)]),
        "gallery": records(data_dir / "bounding_box_test", [
            ("0000_c1s1_000003_02.jpg", 0, 1, -1),  # distractor kept, junk (-1) dropped
            ("0002_c1s1_000002_01.jpg", 2, 1, -1),
            ("0007_c2s1_000009_01.jpg", 7, 2, -1),
            ("0007_c5s1_000001_01.jpg", 7, 5, -1),
        ]),
    }


@pytest.mark.parametrize("folder", ["market1501/Market-1501-v15.09.15", "market1501"])
def test_market1501_records_with_and_without_the_versioned_folder(tmp_path, folder):
    data_dir = market_tree(tmp_path, folder)
    dataset = build_dataset("market1501", tmp_path)
    assert dataset.root == str(data_dir)
    assert {split: dataset.split(split) for split in ("train", "query", "gallery")} == expected_market(data_dir)
    assert dataset.problems == []
    assert (dataset.num_train_pids, dataset.num_train_cams, dataset.num_train_tracklets) == (3, 3, 4)


def test_market1501_root_may_be_the_dataset_folder_itself(tmp_path):
    data_dir = market_tree(tmp_path, "market1501")
    assert build_dataset("market1501", data_dir).train == expected_market(data_dir)["train"]


def test_market1501_lists_unparsable_names_and_keeps_going(tmp_path):
    data_dir = market_tree(tmp_path)
    write_images(data_dir / "query", ["holiday.jpg", "c1_0002.jpg"])
    dataset = build_dataset("market1501", tmp_path)
    assert dataset.query == expected_market(data_dir)["query"]
    assert [p.split(":")[0] for p in dataset.problems] == [
        str(data_dir / "query" / "c1_0002.jpg"),
        str(data_dir / "query" / "holiday.jpg"),
    ]
    assert all("does not match PID_cCAM" in p for p in dataset.problems)


def test_images_in_a_folder_inside_a_split_are_named_not_silently_left_out(tmp_path):
    """Found by a bad-input review: images moved into bounding_box_train/sub/ vanished from the statistics with
    "no problems found". They are still not read (the released layout is flat, as torchreid reads it)."""
    data_dir = market_tree(tmp_path)
    write_images(data_dir / "bounding_box_train" / "sub" / "deeper", ["0003_c1s1_000001_01.jpg"])
    write_images(data_dir / "bounding_box_train" / "sub", ["0003_c2s1_000001_01.jpg"])
    (data_dir / "bounding_box_train" / "notes").mkdir()  # a folder without images is not named
    dataset = build_dataset("market1501", tmp_path)
    assert dataset.train == expected_market(data_dir)["train"]
    assert dataset.problems == [f"{data_dir / 'bounding_box_train' / 'sub'}: a folder of 2 images inside a split, "
                                "which this layout does not read (images lie directly in the split folder, as "
                                "released); move them up or remove the folder"]


def test_debris_is_skipped_and_links_to_nothing_and_other_formats_are_named(tmp_path):
    import os

    data_dir = market_tree(tmp_path)
    train = data_dir / "bounding_box_train"
    # What a Finder copy or a Windows zip adds: macOS ._ twins (not images), .DS_Store, a name that is not UTF-8.
    (train / "._0002_c1s1_000451_03.jpg").write_bytes(b"\x00\x05\x16\x07")
    (train / ".DS_Store").write_bytes(b"\x00")
    latin1 = os.fsdecode(os.fsencode(str(train)) + b"/0002_c3s1_000009_01_\xe9.jpg")
    write_images(train, [Path(latin1).name])
    (train / "0007_c3s1_000001_01.jpg").symlink_to(tmp_path / "gone.jpg")
    dataset = build_dataset("market1501", tmp_path)
    assert [r.path for r in dataset.train] == sorted([r.path for r in expected_market(data_dir)["train"]] + [latin1])
    assert dataset.problems == [f"{train / '0007_c3s1_000001_01.jpg'}: a link to a file that does not exist; "
                                "re-link or remove it"]
    from kdreid.stages.data import dataset_fingerprint

    assert len(dataset_fingerprint(dataset, str(tmp_path))) == 33  # a name that is not UTF-8 is hashed as bytes

    # The same layout of PNG files: none is read (Market ships JPEGs, as torchreid reads it), and that is said.
    query = data_dir / "query"
    for image in query.iterdir():
        image.rename(image.with_suffix(".png"))
    dataset = build_dataset("market1501", tmp_path)
    assert dataset.query == [] and dataset.problems[-1] == (
        f"{query}: no .jpg images but 2 .png files; this layout reads .jpg images, as released: convert them")


@pytest.mark.parametrize("dataset_name, tree, names, module, cls", [
    ("market1501", market_tree, MARKET_NAMES, "market1501.py", "Market1501"),
    ("dukemtmcreid", duke_tree, DUKE_NAMES, "dukemtmcreid.py", "DukeMTMCreID"),
])
def test_market_style_parsing_matches_torchreid(tmp_path, monkeypatch, dataset_name, tree, names, module, cls):
    # torchreid reads one-digit cameras only and asserts their range: compare on such names.
    one_digit = {split: [n for n in split_names if "_c12" not in n] for split, split_names in names.items()}
    data_dir = tree(tmp_path) if names is DUKE_NAMES else market_tree(tmp_path, names=one_digit)
    reference = getattr(torchreid_reader(monkeypatch, module), cls)
    dataset = build_dataset(dataset_name, tmp_path)
    for split, folder in (("train", "bounding_box_train"), ("query", "query"), ("gallery", "bounding_box_test")):
        theirs = reference.process_dir(None, str(data_dir / folder), relabel=split == "train")
        ours = dataset.split(split)
        assert sorted((path, camid + 1) for path, _, camid in theirs) == sorted((r.path, r.camid) for r in ours)
        their_pid = {path: pid for path, pid, _ in theirs}
        if split == "train":  # torchreid numbers pids in set order, we in sorted order: the same partition
            assert len({(their_pid[r.path], r.pid) for r in ours}) == len({r.pid for r in ours})
            assert sorted({r.pid for r in ours}) == list(range(len({r.pid for r in ours})))
        else:
            assert all(their_pid[r.path] == r.pid for r in ours)


# ---------------------------------------------------------------------------------------------- DukeMTMC-reID
def test_dukemtmcreid_records(tmp_path):
    data_dir = duke_tree(tmp_path)
    dataset = build_dataset("dukemtmcreid", tmp_path)
    assert dataset.root == str(data_dir)
    assert dataset.train == records(data_dir / "bounding_box_train", [
        ("0001_c2_f0046182.jpg", 0, 2, 0), ("0001_c6_f0071522.jpg", 0, 6, 1), ("0005_c2_f0046200.jpg", 1, 2, 2)])
    assert dataset.query == records(data_dir / "query", [("0003_c1_f0044158.jpg", 3, 1, -1)])
    assert dataset.gallery == records(data_dir / "bounding_box_test", [
        ("0003_c1_f0044159.jpg", 3, 1, -1), ("0003_c8_f0061220.jpg", 3, 8, -1), ("0009_c4_f0000001.jpg", 9, 4, -1)])


# ---------------------------------------------------------------------------------------------- MSMT17
@pytest.mark.parametrize("version, train_dir, test_dir", [
    ("MSMT17_V1", "train", "test"), ("MSMT17_V2", "mask_train_v2", "mask_test_v2")])
def test_msmt17_records_from_list_files(tmp_path, version, train_dir, test_dir):
    data_dir = msmt_tree(tmp_path, version)
    dataset = build_dataset("msmt17", tmp_path)
    assert dataset.root == str(data_dir)
    train, test = data_dir / train_dir, data_dir / test_dir
    # train = list_train + list_val; camera = third `_` field as written; tracklets = (pid, camera)
    assert dataset.train == records(train, [
        ("0000/0000_000_01_0303morning_0015_0.jpg", 0, 1, 0),
        ("0000/0000_001_03_0303morning_0016_0.jpg", 0, 3, 1),
        ("0001/0001_000_14_0303noon_0100_1.jpg", 1, 14, 2),
        ("0001/0001_001_14_0303noon_0101_1.jpg", 1, 14, 2),
        ("0002/0002_000_02_0303afternoon_0001_0.jpg", 2, 2, 3),
    ])
    assert dataset.query == records(test, [
        ("0000/0000_000_15_0113morning_0001_0.jpg", 0, 15, -1), ("0001/0001_000_02_0113noon_0002_0.jpg", 1, 2, -1)])
    assert dataset.gallery == records(test, [
        ("0000/0000_001_01_0113morning_0003_0.jpg", 0, 1, -1),
        ("0001/0001_001_05_0113noon_0004_0.jpg", 1, 5, -1),
        ("0001/0001_002_02_0113noon_0005_0.jpg", 1, 2, -1),
    ])


def test_msmt17_matches_torchreid_list_parsing(tmp_path, monkeypatch):
    data_dir = msmt_tree(tmp_path)
    reference = torchreid_reader(monkeypatch, "msmt17.py").MSMT17
    dataset = build_dataset("msmt17", tmp_path)
    theirs = {split: [] for split in ("train", "query", "gallery")}
    for list_name, split, folder in (("list_train.txt", "train", "train"), ("list_val.txt", "train", "train"),
                                     ("list_query.txt", "query", "test"), ("list_gallery.txt", "gallery", "test")):
        theirs[split] += reference.process_dir(None, str(data_dir / folder), str(data_dir / list_name))
    for split, their_records in theirs.items():
        assert sorted((p, pid, cam + 1) for p, pid, cam in their_records) == \
            sorted((r.path, r.pid, r.camid) for r in dataset.split(split))


def test_msmt17_list_files_resaved_with_a_bom_are_read(tmp_path):
    data_dir = msmt_tree(tmp_path)
    expected = build_dataset("msmt17", tmp_path)
    for list_file in data_dir.glob("list_*.txt"):
        list_file.write_bytes(b"\xef\xbb\xbf" + list_file.read_bytes())  # what Notepad writes
    dataset = build_dataset("msmt17", tmp_path)
    assert dataset.problems == [] and dataset.split("gallery") == expected.split("gallery")


def test_msmt17_malformed_list_line_is_a_problem(tmp_path):
    data_dir = msmt_tree(tmp_path)
    with open(data_dir / "list_query.txt", "a") as handle:
        handle.write("0003/broken.jpg\n")
    dataset = build_dataset("msmt17", tmp_path)
    assert len(dataset.query) == len(MSMT_LISTS["list_query.txt"])
    assert dataset.problems == [
        f"{data_dir / 'list_query.txt'}:3: expected 'DIR/PID_IDX_CAM_....jpg PID', got '0003/broken.jpg'"]


def test_msmt17_missing_list_or_image_folder_is_a_one_line_error(tmp_path):
    data_dir = msmt_tree(tmp_path)
    (data_dir / "list_val.txt").unlink()
    with pytest.raises(DatasetError, match=r"list file .*list_val.txt is missing; re-extract MSMT17_V1"):
        build_dataset("msmt17", tmp_path)
    msmt_tree(tmp_path)
    (data_dir / "test").rename(data_dir / "elsewhere")
    with pytest.raises(DatasetError, match=r"image folder .*MSMT17_V1/test/ is missing"):
        build_dataset("msmt17", tmp_path)


def test_msmt17_market_style_repack_is_read_too(tmp_path):
    data_dir = market_tree(tmp_path, "msmt17/MSMT17_V1")
    dataset = build_dataset("msmt17", tmp_path)
    assert dataset.train == expected_market(data_dir)["train"]


# ---------------------------------------------------------------------------------------------- custom
def test_custom_from_file_names(tmp_path):
    folder = tmp_path / "mycams"
    write_images(folder / "train", ["0005_c1_a.jpg", "0005_c2_b.png", "0011_c10_x.jpeg"])
    write_images(folder / "train" / "day2", ["0005_c1_c.jpg"])
    write_images(folder / "query", ["0005_c3_q.jpg"])
    write_images(folder / "gallery", ["0005_c1_g.jpg", "0000_c2_d.jpg", "-1_c2_j.jpg", "notes.jpg"])
    dataset = build_dataset("custom", folder)
    assert dataset.train == [
        ImageRecord(str(folder / "train/0005_c1_a.jpg"), 0, 1, 0),
        ImageRecord(str(folder / "train/0005_c2_b.png"), 0, 2, 1),
        ImageRecord(str(folder / "train/0011_c10_x.jpeg"), 1, 10, 2),
        ImageRecord(str(folder / "train/day2/0005_c1_c.jpg"), 0, 1, 0),
    ]
    assert dataset.query == [ImageRecord(str(folder / "query/0005_c3_q.jpg"), 5, 3)]
    assert dataset.gallery == [ImageRecord(str(folder / "gallery/0000_c2_d.jpg"), 0, 2),
                               ImageRecord(str(folder / "gallery/0005_c1_g.jpg"), 5, 1)]
    assert dataset.problems == [
        f"{folder / 'gallery/notes.jpg'}: file name does not match PID_cCAM_*.jpg; rename or remove it"]
    # the parent folder works as well when the custom folder is called custom/
    (tmp_path / "parent").mkdir()
    folder.rename(tmp_path / "parent" / "custom")
    assert len(build_dataset("custom", tmp_path / "parent").train) == 4


def test_custom_follows_linked_folders_and_skips_macos_folders(tmp_path):
    folder = tmp_path / "mycams"
    write_images(folder / "train", ["0005_c1_a.jpg"])
    write_images(tmp_path / "elsewhere", ["0006_c2_b.jpg"])
    (folder / "train" / "linked").symlink_to(tmp_path / "elsewhere")
    (folder / "train" / "loop").symlink_to(folder / "train")  # walked once, not forever
    write_images(folder / "train" / "__MACOSX", ["._0005_c1_a.jpg"])
    write_images(folder / "query", ["0005_c3_q.jpg"])
    write_images(folder / "gallery", ["0005_c1_g.jpg"])
    dataset = build_dataset("custom", folder)
    assert [(Path(r.path).name, r.pid) for r in dataset.train] == [("0005_c1_a.jpg", 0), ("0006_c2_b.jpg", 1)]
    assert dataset.problems == []


def test_custom_from_csv_manifest_with_tracklets(tmp_path):
    folder = tmp_path / "shop"
    write_images(folder / "train", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    write_images(folder / "query", ["q.jpg"])
    write_images(folder / "gallery", ["g1.jpg", "g2.jpg"])
    write_csv(folder / "manifest.csv", ["path", "pid", "camid", "tracklet"], [
        ["train/a.jpg", 40, 1, 900], ["train/b.jpg", 40, 1, 900], ["train/c.jpg", 12, 2, 17],
        ["train/d.jpg", 12, 3, ""],  # no tracklet: its own (pid, camera) tracklet, numbered after the given ones
        ["query/q.jpg", 12, 1, 5], ["gallery/g1.jpg", 12, 2, ""], ["gallery/g2.jpg", 40, 3, 8],
        ["elsewhere.jpg", 1, 1, ""], ["train/x.jpg", "forty", 1, ""],
    ])
    dataset = build_dataset("custom", folder)
    # pids 12, 40 -> 0, 1; tracklets given 17, 900 and derived 901 for (12, camera 3) -> 0, 1, 2
    assert [(Path(r.path).name, r.pid, r.camid, r.tracklet) for r in dataset.train] == [
        ("a.jpg", 1, 1, 1), ("b.jpg", 1, 1, 1), ("c.jpg", 0, 2, 0), ("d.jpg", 0, 3, 2)]
    assert dataset.query == [ImageRecord(str(folder / "query/q.jpg"), 12, 1, 5)]
    assert dataset.gallery == [ImageRecord(str(folder / "gallery/g1.jpg"), 12, 2, -1),
                               ImageRecord(str(folder / "gallery/g2.jpg"), 40, 3, 8)]
    manifest = folder / "manifest.csv"
    assert dataset.problems == [
        f"{manifest}:9: cannot tell the split of elsewhere.jpg; put it under train/, query/ or gallery/ "
        "or add a split column",
        f"{manifest}:10: expected integer pid and camid (and tracklet), got train/x.jpg,forty,1,; fix the row",
    ]


def test_manifest_rows_a_run_cannot_use_are_problems_naming_the_row(tmp_path):
    """Found by a bad-input review: a pid beyond int64 passed `data check` and failed in evaluation with a traceback;
    a repeated row was counted twice; pid -5 was taken; a split column of 'Train' was called missing."""
    folder = tmp_path / "custom"
    write_images(folder / "imgs", ["1.jpg", "2.jpg", "3.jpg"])
    write_csv(folder / "manifest.csv", ["path", "pid", "camid", "split"], [
        ["imgs/1.jpg", 3, 1, "train"], ["imgs/2.jpg", 3, 2, "query"], ["imgs/3.jpg", 3, 1, "gallery"],
        ["imgs/3.jpg", 3, 1, "gallery"], ["imgs/2.jpg", 99999999999999999999, 1, "query"],
        ["imgs/1.jpg", -5, 1, "train"], ["imgs/1.jpg", 3, -2, "train"], ["imgs/x.jpg", 3, 1, "Train"]])
    dataset = build_dataset("custom", tmp_path)
    assert (len(dataset.train), len(dataset.query), len(dataset.gallery)) == (1, 1, 1)
    manifest = folder / "manifest.csv"
    assert dataset.problems[0] == f"{manifest}:5: imgs/3.jpg is listed again (first at line 4): one row per image; " \
        "remove the repeated row"
    assert [problem.split(": ")[1] for problem in dataset.problems[1:4]] == [
        "pid 99999999999999999999, camid 1, tracklet -1", "pid -5, camid 1, tracklet -1",
        "pid 3, camid -2, tracklet -1"]
    assert dataset.problems[4] == f"{manifest}:9: split 'Train' of imgs/x.jpg is not one of train, query, gallery " \
        "(lower case); fix the row"


def test_custom_csv_with_split_column(tmp_path):
    folder = tmp_path / "custom"
    write_images(folder / "imgs", ["1.jpg", "2.jpg", "3.jpg"])
    write_csv(folder / "manifest.csv", ["path", "pid", "camid", "split"],
              [["imgs/1.jpg", 3, 1, "train"], ["imgs/2.jpg", 3, 2, "query"], ["imgs/3.jpg", 3, 1, "gallery"]])
    dataset = build_dataset("custom", tmp_path)
    assert (dataset.train, dataset.query, dataset.gallery) == (
        [ImageRecord(str(folder / "imgs/1.jpg"), 0, 1, 0)],
        [ImageRecord(str(folder / "imgs/2.jpg"), 3, 2)],
        [ImageRecord(str(folder / "imgs/3.jpg"), 3, 1)],
    )


def test_custom_reads_upper_case_suffixes_and_a_manifests_nested_paths(tmp_path):
    """Found by a review: camera and phone exports write .JPG, and a manifest's path may sit deeper than its
    split folder (train/cam1/...): a case-sensitive suffix or the split taken from the last folder passed."""
    folder = tmp_path / "upper"
    write_images(folder / "train", ["0001_c1_a.JPG", "0001_c2_b.Jpeg"])
    write_images(folder / "query", ["0002_c1_a.PNG"])
    write_images(folder / "gallery", ["0002_c2_b.jpg"])
    dataset = build_dataset("custom:upper", tmp_path)
    assert [len(dataset.split(split)) for split in ("train", "query", "gallery")] == [2, 1, 1]
    assert dataset.problems == [] and dataset.query[0].pid == 2
    nested = tmp_path / "nested"
    rows = [["train/cam1/a.jpg", 1, 1], ["train/cam2/b.jpg", 1, 2], ["query/site/c.jpg", 2, 2],
            ["gallery/site/d.jpg", 2, 1]]
    for row in rows:
        write_images(nested / Path(row[0]).parent, [Path(row[0]).name])
    write_csv(nested / "manifest.csv", ["path", "pid", "camid"], rows)
    dataset = build_dataset("custom:nested", tmp_path)
    assert dataset.problems == []
    assert [[Path(r.path).relative_to(nested).as_posix() for r in dataset.split(split)]
            for split in ("train", "query", "gallery")] == [["train/cam1/a.jpg", "train/cam2/b.jpg"],
                                                            ["query/site/c.jpg"], ["gallery/site/d.jpg"]]


def test_several_custom_datasets_side_by_side(tmp_path):
    """`custom:NAME` reads ROOT/NAME with the custom rules, so one run can adapt to two of one's own sites."""
    write_images(tmp_path / "site_a" / "train", ["0001_c1_a.jpg", "0002_c2_b.jpg"])
    for split in ("query", "gallery"):
        write_images(tmp_path / "site_a" / split, [f"0001_c{1 + (split == 'query')}_{split}.jpg"])
    write_images(tmp_path / "site_b" / "tracks", ["t1.jpg", "t2.jpg", "t3.jpg"])
    write_csv(tmp_path / "site_b" / "manifest.csv", ["path", "pid", "camid", "tracklet", "split"],
              [[f"tracks/t{i}.jpg", 70 + i // 3, 4, 70 + i // 3, "train"] for i in (1, 2, 3)])
    site_a, site_b = build_dataset("custom:site_a", tmp_path), build_dataset("custom:site_b", tmp_path)
    assert (site_a.name, site_a.root, len(site_a.train), len(site_a.query)) == (
        "custom:site_a", str(tmp_path / "site_a"), 2, 1)
    assert site_a.train[0] == ImageRecord(str(tmp_path / "site_a/train/0001_c1_a.jpg"), 0, 1, 0)
    assert (site_b.name, [r.tracklet for r in site_b.train], site_b.query) == ("custom:site_b", [0, 0, 1], [])
    # --root may be the site's folder itself, as for the synthetic domains
    assert build_dataset("custom:site_a", tmp_path / "site_a").train == site_a.train
    assert "custom:FOLDER" in dataset_names()
    # a typo names the sites that are there; a name that is not a folder name is refused
    with pytest.raises(DatasetError,
                       match=r"^dataset custom:site_c: expected train/.* holds custom:site_a, custom:site_b$"):
        build_dataset("custom:site_c", tmp_path)
    # so does plain `custom` when --root is their parent (the folder is not called custom/)
    with pytest.raises(DatasetError, match=r"^dataset custom: expected train/.* holds custom:site_a, custom:site_b$"):
        build_dataset("custom", tmp_path)
    with pytest.raises(DatasetError, match=r"after 'custom:' comes the name of a folder"):
        build_dataset("custom:../site_a", tmp_path)
    with pytest.raises(DatasetError, match=r"unknown dataset 'market:site_a'; known: .*custom:FOLDER"):
        build_dataset("market:site_a", tmp_path)


# ---------------------------------------------------------------------------------------------- synthetic
def test_synthetic_domain_uses_market_rules_and_manifest_tracklets(tmp_path):
    names = {
        "bounding_box_train": ["0003_c11s1_000010_00.jpg", "0003_c11s1_000011_00.jpg", "0003_c2s4_000500_00.jpg",
                               "0008_c2s1_000001_00.jpg"],
        "query": ["0005_c14s2_000001_00.jpg"],
        "bounding_box_test": ["0005_c1s2_000002_00.jpg", "0000_c15s1_000004_00.jpg", "-1_c3s1_000001_00.jpg"],
    }
    domain = market_tree(tmp_path, "synth_msmt", names)
    rows = [["bounding_box_train/0003_c11s1_000010_00.jpg", 3, 11, 41, "train", 0.5],
            ["bounding_box_train/0003_c11s1_000011_00.jpg", 3, 11, 41, "train", 0.7],
            ["bounding_box_train/0003_c2s4_000500_00.jpg", 3, 2, 7, "train", 0.1],
            ["bounding_box_train/0008_c2s1_000001_00.jpg", 8, 2, 60, "train", 0.2],
            ["query/0005_c14s2_000001_00.jpg", 5, 14, 3, "query", 0.3],
            ["bounding_box_test/0005_c1s2_000002_00.jpg", 5, 1, 2, "gallery", 0.3],
            ["bounding_box_test/0000_c15s1_000004_00.jpg", 0, 15, 99, "gallery", 0.3]]
    write_csv(domain / "manifest.csv", ["path", "pid", "camid", "tracklet", "split", "scale"], rows)
    dataset = build_dataset("synth_msmt", tmp_path)
    train_dir, test_dir = domain / "bounding_box_train", domain / "bounding_box_test"
    assert dataset.train == records(train_dir, [  # tracklets 7, 41, 60 -> 0, 1, 2
        ("0003_c11s1_000010_00.jpg", 0, 11, 1), ("0003_c11s1_000011_00.jpg", 0, 11, 1),
        ("0003_c2s4_000500_00.jpg", 0, 2, 0), ("0008_c2s1_000001_00.jpg", 1, 2, 2)])
    assert dataset.query == records(domain / "query", [("0005_c14s2_000001_00.jpg", 5, 14, 3)])
    assert dataset.gallery == records(test_dir, [("0000_c15s1_000004_00.jpg", 0, 15, 99),
                                                 ("0005_c1s2_000002_00.jpg", 5, 1, 2)])
    assert dataset.problems == []


def test_synthetic_domain_without_manifest_and_manifest_mismatches(tmp_path):
    domain = market_tree(tmp_path, "synth_duke", DUKE_NAMES)
    assert [r.tracklet for r in build_dataset("synth_duke", tmp_path).train] == [0, 1, 2]
    write_csv(domain / "manifest.csv", ["path", "pid", "camid", "tracklet", "split"],
              [["bounding_box_train/0001_c2_f0046182.jpg", 1, 3, 5, "train"]])  # wrong camera; others missing
    problems = build_dataset("synth_duke", tmp_path).problems
    assert len(problems) == 2
    assert problems[0].startswith(f"{domain / 'manifest.csv'}: 6 images have no tracklet there")
    assert problems[1].startswith(f"{domain / 'manifest.csv'}: pid/camid of 1 images differ from their file names")


def test_every_layout_is_registered():
    assert set(dataset_names()) >= {"market1501", "dukemtmcreid", "cuhk03", "msmt17", "custom",
                                    "synth_market", "synth_duke", "synth_cuhk", "synth_msmt"}


def test_walk_files_leaves_out_hidden_files_and_macos_folders(tmp_path):
    # What `kdreid extract` and the custom layout list as images: a Finder copy's ._ twins and .DS_Store are not.
    from kdreid.data.datasets.base import walk_files

    write_images(tmp_path, ["a.jpg", "._a.jpg"])
    write_images(tmp_path / "cam2", ["b.jpg", "._b.jpg"])
    write_images(tmp_path / "__MACOSX", ["c.jpg"])
    write_images(tmp_path / ".trash", ["d.jpg"])
    (tmp_path / ".DS_Store").write_bytes(b"\x00")
    assert walk_files(tmp_path) == [tmp_path / "a.jpg", tmp_path / "cam2" / "b.jpg"]
