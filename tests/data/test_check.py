"""`kdreid data check`: statistics per split, every problem listed, exit codes, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdreid.cli import main
from kdreid.data.check import dataset_statistics, find_problems
from kdreid.data.datasets import build_dataset
from kdreid.data.images import find_unreadable_images, image_problem
from tests.data.layouts import duke_tree, market_tree, msmt_tree, tiny_image_bytes, write_csv, write_images

MARKET_STATISTICS = {
    "train": {"ids": 3, "images": 5, "cameras": 3},  # junk dropped
    "query": {"ids": 2, "images": 2, "cameras": 2},
    "gallery": {"ids": 3, "images": 4, "cameras": 3},  # the distractor pid 0 counts as an id
}


def run_check(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["data", "check", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_an_unlabelled_custom_target_is_not_a_problem(tmp_path, capsys):
    """Tracker crops with training images only: a target adapt and distill train on, so `data check` passes it and
    says what it is; a released layout without a query split is still a problem."""
    write_images(tmp_path / "site" / "crops", ["a.jpg", "b.jpg"])
    write_csv(tmp_path / "site" / "manifest.csv", ["path", "pid", "camid", "tracklet", "split"],
              [["crops/a.jpg", 4, 1, 4, "train"], ["crops/b.jpg", 4, 1, 4, "train"]])
    code, out, _ = run_check(capsys, "--root", str(tmp_path), "-d", "custom:site")
    assert code == 0 and "note: no query or gallery: an unlabelled target" in out and "no problems found" in out
    # without a manifest: a train/ folder alone (one of query/, gallery/ alone is still a missing split)
    write_images(tmp_path / "named" / "train", ["0004_c1_a.jpg", "0004_c1_b.jpg"])
    code, out, _ = run_check(capsys, "--root", str(tmp_path), "-d", "custom:named")
    assert code == 0 and "an unlabelled target" in out and "train tracklets: 1" in out
    (tmp_path / "named" / "query").mkdir()
    code, _, err = run_check(capsys, "--root", str(tmp_path), "-d", "custom:named")
    assert code == 2 and "split folder" in err and "gallery/ is missing" in err


def test_statistics_count_as_torchreid_counts(tmp_path):
    market_tree(tmp_path)
    assert dataset_statistics(build_dataset("market1501", tmp_path)) == MARKET_STATISTICS


def test_json_output_is_only_the_statistics_and_problems(tmp_path, capsys):
    market_tree(tmp_path)
    code, out, _ = run_check(capsys, "--root", str(tmp_path), "-d", "market1501", "--json")
    assert code == 0
    assert json.loads(out) == {**MARKET_STATISTICS, "problems": []}


def test_table_output(tmp_path, capsys):
    data_dir = market_tree(tmp_path)
    code, out, _ = run_check(capsys, "--root", str(tmp_path), "-d", "market1501")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"market1501: {data_dir}"
    assert lines[2].split() == ["train", "3", "5", "3"]
    assert lines[3].split() == ["query", "2", "2", "2"]
    assert lines[4].split() == ["gallery", "3", "4", "3"]
    assert lines[5].strip() == "train tracklets: 4"
    assert lines[-1] == "11 images decoded; no problems found"


def test_every_problem_is_listed_not_just_the_first(tmp_path, capsys):
    data_dir = market_tree(tmp_path)
    truncated = data_dir / "bounding_box_train" / "0002_c1s1_000451_03.jpg"
    truncated.write_bytes(tiny_image_bytes(1)[:-40])
    garbage = data_dir / "query" / "0007_c2s1_000001_01.jpg"
    garbage.write_bytes(b"\xff\xd8 this is not a jpeg")
    write_images(data_dir / "bounding_box_test", ["IMG_0001.jpg"])
    code, out, _ = run_check(capsys, "--root", str(tmp_path), "-d", "market1501", "--json")
    assert code == 1
    report = json.loads(out)
    assert report["train"] == MARKET_STATISTICS["train"]  # still counted: parsing does not decode
    problems = report["problems"]
    assert len(problems) == 3
    assert problems[0].startswith(f"{data_dir / 'bounding_box_test' / 'IMG_0001.jpg'}: file name does not match")
    assert problems[1].startswith(f"{truncated}: cannot decode (image file is truncated")
    assert problems[2].startswith(f"{garbage}: cannot decode (")
    assert all(p.endswith("re-extract the dataset or remove the file") for p in problems[1:])
    # the table says the same and exits 1
    code, out, _ = run_check(capsys, "--root", str(tmp_path), "-d", "market1501")
    assert code == 1 and "3 problems:" in out and f"  - {truncated}: cannot decode" in out


def test_no_verify_skips_decoding_but_still_finds_missing_files(tmp_path, capsys):
    data_dir = msmt_tree(tmp_path)
    (data_dir / "train" / "0000" / "0000_000_01_0303morning_0015_0.jpg").write_bytes(b"\xff\xd8 truncated")
    missing = data_dir / "test" / "0001" / "0001_002_02_0113noon_0005_0.jpg"
    missing.unlink()
    code, out, _ = run_check(capsys, "--root", str(tmp_path), "-d", "msmt17", "--json", "--no-verify")
    assert code == 1
    assert json.loads(out)["problems"] == [f"{missing}: file is missing; re-extract the dataset or remove the file"]
    assert len(find_problems(build_dataset("msmt17", tmp_path), verify=True)) == 2


def test_empty_split_is_a_problem(tmp_path):
    data_dir = market_tree(tmp_path)
    for path in (data_dir / "query").iterdir():
        path.unlink()
    problems = find_problems(build_dataset("market1501", tmp_path))
    assert f"{data_dir}: the query split of market1501 has no images; check the layout" in problems
    assert not any("another camera" in p for p in problems)  # nothing to say about queries when there are none


def test_a_released_layout_with_empty_query_and_gallery_is_a_problem(tmp_path):
    """Only a custom dataset may be an unlabelled target (train only); a Market-1501 tree whose query and gallery
    folders are empty is a broken extraction, said for both splits."""
    data_dir = market_tree(tmp_path)
    for split in ("query", "bounding_box_test"):
        for path in (data_dir / split).iterdir():
            path.unlink()
    problems = find_problems(build_dataset("market1501", tmp_path), verify=False)
    assert problems == [f"{data_dir}: the {split} split of market1501 has no images; check the layout"
                        for split in ("query", "gallery")]


def test_custom_dataset_where_no_query_has_a_cross_camera_match(tmp_path, capsys):
    folder = tmp_path / "custom"
    write_images(folder / "train", ["0001_c1_a.jpg"])
    write_images(folder / "query", ["0002_c1_q.jpg", "0003_c2_q.jpg"])
    write_images(folder / "gallery", ["0002_c1_g.jpg", "0003_c2_g.jpg", "0004_c1_g.jpg"])
    code, out, _ = run_check(capsys, "--root", str(tmp_path), "-d", "custom", "--json")
    assert code == 1
    assert json.loads(out)["problems"] == [
        f"{folder}: no query has a gallery image of its identity from another camera (every query shares its "
        "camera with all of its gallery matches), so evaluation would score nothing; add gallery images of the "
        "query identities from other cameras, or check the camera ids"]
    # one query with a cross-camera match is enough to evaluate: a note in the table, not a problem
    write_images(folder / "gallery", ["0003_c5_g.jpg"])
    code, out, _ = run_check(capsys, "--root", str(tmp_path), "-d", "custom")
    assert code == 0 and "note: 1 of 2 queries have no cross-camera match; evaluation skips them" in out


def test_tracklets_crossing_cameras_or_people_are_problems(tmp_path):
    folder = tmp_path / "custom"
    write_images(folder / "train", ["a.jpg", "b.jpg", "c.jpg"])
    write_images(folder / "query", ["q.jpg"])
    write_images(folder / "gallery", ["g.jpg"])
    write_csv(folder / "manifest.csv", ["path", "pid", "camid", "tracklet"], [
        ["train/a.jpg", 1, 1, 0], ["train/b.jpg", 1, 2, 0], ["train/c.jpg", 2, 1, 0],
        ["query/q.jpg", 1, 1, ""], ["gallery/g.jpg", 1, 2, ""]])
    problems = find_problems(build_dataset("custom", tmp_path), verify=False)
    assert problems == [
        f"{folder}: 1 train tracklets span several cameras (e.g. tracklet 0); "
        "tracklet ids must be unique in the dataset and stay within one camera",
        f"{folder}: 1 train tracklets hold several identities (e.g. tracklet 0); "
        "tracklet ids must be unique in the dataset, not numbered per identity",
    ]


def test_image_verification_helpers(tmp_path):
    good, bad = write_images(tmp_path, ["good.jpg", "bad.jpg"])
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    assert image_problem(str(good)) is None
    assert image_problem(str(tmp_path / "gone.jpg")) == "file is missing"
    many = [str(good)] * 600 + [str(bad)] + [str(good)] * 300  # several blocks over several threads
    assert [path for path, _ in find_unreadable_images(many, workers=3)] == [str(bad)]


# ---------------------------------------------------------------------------------------------- bad input
def assert_usage_error(capsys, argv, *fragments: str) -> str:
    code, out, err = run_check(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("kdreid: error: ")  # one line, no traceback
    for fragment in fragments:
        assert fragment in err
    return err


def test_missing_root(tmp_path, capsys):
    assert_usage_error(capsys, ["--root", str(tmp_path / "nope"), "-d", "market1501"],
                       f"dataset root {tmp_path / 'nope'} does not exist")


def test_unknown_dataset_name(tmp_path, capsys):
    assert_usage_error(capsys, ["--root", str(tmp_path), "-d", "market"], "unknown dataset 'market'", "market1501")


def test_missing_split_folder(tmp_path, capsys):
    data_dir = market_tree(tmp_path)
    for path in (data_dir / "query").iterdir():
        path.unlink()
    (data_dir / "query").rmdir()
    assert_usage_error(capsys, ["--root", str(tmp_path), "-d", "market1501"],
                       f"split folder {data_dir / 'query'}/ is missing", "re-extract Market-1501-v15.09.15.zip")


def test_wrong_layout_names_the_layout_it_looks_like(tmp_path, capsys):
    duke_tree(tmp_path)
    # the Duke parent given for Market-1501
    assert_usage_error(capsys, ["--root", str(tmp_path), "-d", "market1501"],
                       f"no market1501 data under {tmp_path}",
                       "is this the DukeMTMC-reID layout? then name it dukemtmcreid")
    # Duke extracted into the market1501 folder: to be moved where -d dukemtmcreid reads it (naming it dukemtmcreid
    # alone was answered with "is this the Market-1501 layout? then name it market1501", the folder's name)
    (tmp_path / "dukemtmc-reid").rename(tmp_path / "market1501")
    assert_usage_error(capsys, ["--root", str(tmp_path), "-d", "market1501"],
                       f"expected bounding_box_train under {tmp_path / 'market1501'}",
                       f"it holds the DukeMTMC-reID layout, which -d dukemtmcreid reads under "
                       f"{tmp_path / 'dukemtmc-reid'}: move it there")
    # an MSMT17 tree given as Duke, a Market tree given as MSMT17
    msmt_tree(tmp_path / "m")
    assert_usage_error(capsys, ["--root", str(tmp_path / "m"), "-d", "dukemtmcreid"], "is this the MSMT17 layout?")
    market_tree(tmp_path / "k", "custom")
    assert_usage_error(capsys, ["--root", str(tmp_path / "k" / "custom"), "-d", "custom"],
                       "expected train/, query/, gallery/", "is this the Market-1501 (bounding_box_train/) layout?")


def test_a_dataset_one_folder_off_its_layout_is_named_with_the_move(tmp_path, capsys):
    """Found by a review: a zip extracted twice, a renamed folder or a version folder left out got 'no market1501
    data under ROOT' or 'expected bounding_box_train under X', not where the files are nor what to move."""
    nested = market_tree(tmp_path / "a", "market1501/Market-1501-v15.09.15/Market-1501-v15.09.15")
    assert_usage_error(capsys, ["--root", str(tmp_path / "a"), "-d", "market1501"],
                       f"{nested / 'bounding_box_train'} is not where the market1501 layout has it",
                       f"move the contents of {nested}/ there")
    renamed = market_tree(tmp_path / "b", "Market-1501")
    assert_usage_error(capsys, ["--root", str(tmp_path / "b"), "-d", "market1501"],
                       f"{renamed / 'bounding_box_train'} is not where", f"move the contents of {renamed}/ there")
    flat = msmt_tree(tmp_path / "c")
    for path in list(flat.iterdir()):
        path.rename(flat.parent / path.name)
    flat.rmdir()
    assert_usage_error(capsys, ["--root", str(tmp_path / "c"), "-d", "msmt17"],
                       f"{flat.parent / 'list_train.txt'} is not where the msmt17 layout has it",
                       f"move the contents of {flat.parent}/ there")
    # another dataset's folder is named as that dataset, never as a folder to move
    market_tree(tmp_path / "d", "synth_market")
    assert_usage_error(capsys, ["--root", str(tmp_path / "d"), "-d", "market1501"], "then name it synth_market")


def test_another_dataset_in_the_folder_given_as_root_is_to_move_beside_it(tmp_path, capsys):
    """--root at the dataset's own folder: the other dataset found there goes beside it, under its parent (not
    under the folder given, where -d dukemtmcreid would then not find it either)."""
    duke_tree(tmp_path)
    (tmp_path / "dukemtmc-reid").rename(tmp_path / "market1501")
    assert_usage_error(capsys, ["--root", str(tmp_path / "market1501"), "-d", "market1501"],
                       f"which -d dukemtmcreid reads under {tmp_path / 'dukemtmc-reid'}: move it there")


@pytest.mark.parametrize("other", ["DukeMTMC-reID", "synth_market"])
def test_another_datasets_folder_beside_an_empty_one_is_never_to_move_into_it(tmp_path, capsys, other):
    """ROOT/market1501/ is there but empty, another dataset lies beside it: not named as Market-1501 files to move
    into ROOT/market1501/ (which would mix two datasets)."""
    (tmp_path / "market1501").mkdir()
    market_tree(tmp_path, other)
    err = assert_usage_error(capsys, ["--root", str(tmp_path), "-d", "market1501"],
                             f"expected bounding_box_train under {tmp_path / 'market1501'}")
    assert "is not where" not in err and "move the contents" not in err


def test_cuhk03_flags_belong_to_cuhk03(tmp_path, capsys):
    market_tree(tmp_path)
    assert_usage_error(capsys, ["--root", str(tmp_path), "-d", "market1501", "--cuhk03-labeled"],
                       "apply only to -d cuhk03, not to -d market1501")
    for flags in (["--split-id", "1"], ["--cuhk03-classic-split"]):  # not silently ignored either
        assert_usage_error(capsys, ["--root", str(tmp_path), "-d", "market1501", *flags],
                           "apply only to -d cuhk03, not to -d market1501")


def test_unknown_option_is_an_error(tmp_path):
    from kdreid.errors import DatasetError

    market_tree(tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset option"):
        build_dataset("market1501", tmp_path, lablled=True)
    # a cuhk03 option given to every dataset of a run is fine
    assert build_dataset("market1501", tmp_path, labeled=True).num_train_pids == 3


def test_build_dataset_keeps_root_relative_paths_absolute(tmp_path, monkeypatch):
    market_tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert all(Path(r.path).is_absolute() for r in build_dataset("market1501", ".").train)


def test_parent_of_other_datasets_lists_what_it_holds(tmp_path, capsys):
    market_tree(tmp_path)
    duke_tree(tmp_path)
    market_tree(tmp_path, "synth_duke")
    assert_usage_error(capsys, ["--root", str(tmp_path), "-d", "cuhk03"],
                       f"no cuhk03 data under {tmp_path}: expected {tmp_path / 'cuhk03'}/ holding",
                       "it holds Market-1501, DukeMTMC-reID, synth_duke (named market1501, dukemtmcreid, synth_duke)")


def test_a_file_name_that_is_not_utf8_is_printed_not_a_crash(tmp_path):
    # A zip from another system may hold Latin-1 names; a UTF-8 terminal must still get the report (as bytes).
    import os
    import subprocess
    import sys

    data_dir = market_tree(tmp_path)
    broken = os.fsencode(str(data_dir / "bounding_box_train")) + b"/0002_c1s1_000777_01_\xe9.jpg"
    open(broken, "wb").close()  # zero bytes: a problem line that names the file
    result = subprocess.run([sys.executable, "-m", "kdreid", "data", "check", "--root", str(tmp_path), "-d",
                             "market1501"], capture_output=True, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 1 and b"Traceback" not in result.stderr, result.stderr
    assert broken in result.stdout
