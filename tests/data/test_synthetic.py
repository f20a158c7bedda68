"""The synthetic benchmark: layout, statistics, determinism, no identity leaks, a real domain shift.

One tiny generation (scale 0.01, 64x32, all four domains, ~2,100 images) is shared by the module (and by the
pytest-xdist workers of a run, through a file lock).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from PIL import Image

from kdreid.cli import main
from kdreid.data.datasets.base import build_dataset
from kdreid.data.synthetic import DOMAIN_NAMES, build_domain, generate, render_domain
from kdreid.data.synthetic.writer import truth
from kdreid.errors import KdreidError
from kdreid.rundir import LOCK_FILE

SCALE, SIZE, SEED = 0.01, (64, 32), 0
NAME = re.compile(r"^(-1|\d{4})_c(\d+)s(\d+)_(\d{6})_(\d{2})\.jpg$")
FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The tiny generation, made once per test run (the pytest-xdist workers of a run share it)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the folder shared by all workers of this run
    out = base / "synth_tiny"
    with FileLock(str(out) + ".lock"):
        if not (out / "complete").exists():
            generate(out, DOMAIN_NAMES, scale=SCALE, seed=SEED, size=SIZE, workers=1)
            (out / "complete").touch()
    return out


def parse_folder(folder: Path) -> list[tuple[int, int]]:
    """(pid, camid) of every file, asserting every name matches the Market-1501 pattern."""
    records = []
    for path in sorted(folder.iterdir()):
        match = NAME.match(path.name)
        assert match, f"{path.name} does not match the Market-1501 naming"
        records.append((int(match.group(1)), int(match.group(2))))
    return records


def torchreid_counts(records: list[tuple[int, int]]) -> dict:
    kept = [(p, c) for p, c in records if p != -1]  # junk dropped; the distractor label 0 counts as an id
    return {"ids": len({p for p, _ in kept}), "images": len(kept), "cameras": len({c for _, c in kept})}


@pytest.mark.parametrize("name", DOMAIN_NAMES)
def test_layout_and_statistics_equal_truth(root, name):
    folder = root / name
    expected = json.loads((folder / "truth.json").read_text())
    parsed = {split: parse_folder(folder / sub) for split, sub in FOLDERS.items()}
    for split in FOLDERS:
        assert torchreid_counts(parsed[split]) == expected[split], split
    # the project's own reader (what `kdreid data check --json` prints) agrees
    dataset = build_dataset(name, root)
    assert not dataset.problems
    for split in FOLDERS:
        records = dataset.split(split)
        stats = {"ids": len({r.pid for r in records}), "images": len(records),
                 "cameras": len({r.camid for r in records})}
        assert stats == expected[split], split
    # train and test pids are disjoint; junk only in the gallery folder; distractors only in the gallery
    train_pids = {p for p, _ in parsed["train"]}
    test_pids = {p for p, _ in parsed["query"] + parsed["gallery"]}
    assert not train_pids & test_pids
    assert min(train_pids) >= 1 and min(p for p, _ in parsed["query"]) >= 1


@pytest.mark.parametrize("name", DOMAIN_NAMES)
def test_every_query_has_a_cross_camera_match_and_one_query_per_id_and_camera(root, name):
    query = parse_folder(root / name / "query")
    gallery = set(parse_folder(root / name / "bounding_box_test"))
    assert len(query) == len(set(query))  # one image per (pid, camera)
    for pid, camid in query:
        assert any(p == pid and c != camid for p, c in gallery), (pid, camid)


def test_check_command_json_equals_truth(root, capsys):
    code = main(["data", "check", "--root", str(root), "-d", "synth_msmt", "--json"])
    report = json.loads(capsys.readouterr().out)
    expected = json.loads((root / "synth_msmt" / "truth.json").read_text())
    assert code == 0 and report["problems"] == []
    assert {k: report[k] for k in FOLDERS} == expected


def test_fifteen_cameras_survive_parsing(root):
    dataset = build_dataset("synth_msmt", root)
    cameras = {r.camid for r in dataset.train + dataset.query + dataset.gallery}
    assert cameras == set(range(1, 16))
    assert any(len(str(c)) == 2 for c in cameras)


def test_camera_pairs_of_cuhk(root):
    """CUHK03 style: every id is seen by exactly the two views (c1, c2) of one camera pair (the sequence)."""
    rows = read_manifest(root / "synth_cuhk")
    views = defaultdict(set)
    for row in rows:
        if int(row["pid"]) > 0:
            views[row["pid"]].add((row["camid"], row["seq"]))
    for pid, seen in views.items():
        assert {c for c, _ in seen} == {"1", "2"} and len({s for _, s in seen}) == 1, pid


@pytest.mark.parametrize("name", ["synth_market", "synth_duke", "synth_cuhk", "synth_msmt"])
def test_scale_one_has_the_published_sizes(name):
    published = {
        "synth_market": ((751, 12936), (750, 3368), 15913),
        "synth_duke": ((702, 16522), (702, 2228), 17661),
        "synth_cuhk": ((767, 7365), (700, 1400), 5332),
        "synth_msmt": ((1041, 32621), (3060, 11659), 82161),
    }[name]
    stats = truth(build_domain(name, scale=1.0, seed=SEED))
    assert (stats["train"]["ids"], stats["train"]["images"]) == published[0]
    assert (stats["query"]["ids"], stats["query"]["images"]) == published[1]
    assert stats["gallery"]["images"] == published[2]
    assert stats["gallery"]["ids"] == published[1][0] + 1  # the test ids plus the distractor label 0


def read_manifest(folder: Path) -> list[dict]:
    with open(folder / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("name", DOMAIN_NAMES)
def test_manifest_lists_every_file_with_real_tracklets(root, name):
    folder = root / name
    header = (folder / "manifest.csv").read_text().splitlines()[0]
    assert header.startswith("path,pid,camid,tracklet,split")
    rows = read_manifest(folder)
    files = {f"{sub}/{p.name}" for sub in FOLDERS.values() for p in (folder / sub).iterdir()}
    assert {r["path"] for r in rows} == files and len(rows) == len(files)
    for row in rows:
        assert row["split"] == {"bounding_box_train": "train", "query": "query",
                                "bounding_box_test": "gallery"}[row["path"].split("/")[0]]
        assert NAME.match(row["path"].split("/")[1]).group(1) == row["pid"].zfill(4) or row["pid"] == "-1"
    # a tracklet is one person in one camera, in consecutive frames with a constant step
    tracklets = defaultdict(list)
    for row in rows:
        tracklets[row["tracklet"]].append(row)
    for members in tracklets.values():
        assert len({(m["pid"], m["camid"], m["seq"]) for m in members}) == 1
        frames = sorted(int(m["frame"]) for m in members)
        assert len(set(np.diff(frames))) <= 1


def test_same_seed_same_pixels_other_seed_differs():
    first = render_domain("synth_cuhk", scale=SCALE, seed=3, size=SIZE)
    again = render_domain("synth_cuhk", scale=SCALE, seed=3, size=SIZE)
    other = render_domain("synth_cuhk", scale=SCALE, seed=4, size=SIZE)
    assert first.dtype == np.uint8 and first.shape[1:] == (*SIZE, 3)
    assert np.array_equal(first, again)
    assert first.shape != other.shape or not np.array_equal(first, other)


def test_workers_do_not_change_the_output(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    generate(one, ["synth_duke"], scale=SCALE, seed=SEED, size=SIZE, workers=1)
    generate(two, ["synth_duke"], scale=SCALE, seed=SEED, size=SIZE, workers=2)
    assert (one / "synth_duke" / "manifest.csv").read_bytes() == (two / "synth_duke" / "manifest.csv").read_bytes()
    for sub in FOLDERS.values():
        names = sorted(p.name for p in (one / "synth_duke" / sub).iterdir())
        assert names == sorted(p.name for p in (two / "synth_duke" / sub).iterdir())
        for name in names:
            a = np.asarray(Image.open(one / "synth_duke" / sub / name))
            b = np.asarray(Image.open(two / "synth_duke" / sub / name))
            assert np.array_equal(a, b), name


def mutual_information(labels: np.ndarray, values: np.ndarray) -> float:
    joint = Counter(zip(labels.tolist(), values.tolist()))
    n = len(labels)
    p_label, p_value = Counter(labels.tolist()), Counter(values.tolist())
    return sum(c / n * np.log(c * n / (p_label[a] * p_value[b])) for (a, b), c in joint.items())


def leaks(labels: np.ndarray, values: np.ndarray, strata: np.ndarray | None = None, permutations: int = 200) -> bool:
    """True when `values` carry more information about `labels` than 99 % of random relabellings (labels shuffled
    within each stratum, so that a factor drawn per camera is compared with the camera's own pid mix)."""
    rng = np.random.default_rng(0)
    strata = np.zeros(len(labels), dtype=int) if strata is None else strata
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]

    def shuffled() -> np.ndarray:
        out = labels.copy()
        for members in groups:
            out[members] = labels[rng.permutation(members)]
        return out

    observed = mutual_information(labels, values)
    null = [mutual_information(shuffled(), values) for _ in range(permutations)]
    return observed > np.quantile(null, 0.99)


def test_no_identity_leaks_in_nuisance_factors(root):
    """Camera, panorama, JPEG quality, image size, frame base and box index are independent of pid. Cameras are
    tested per (pid, camera) pair; the per-tracklet factors per tracklet, with pids shuffled within each camera."""
    for name in ("synth_msmt", "synth_market"):
        rows = [r for r in read_manifest(root / name) if int(r["pid"]) > 0]
        pairs = sorted({(int(r["pid"]), r["camera"]) for r in rows})
        pair_pids = np.array([p for p, _ in pairs])
        assert not leaks(pair_pids, np.array([c for _, c in pairs])), (name, "camera")
        first = {}
        for r in rows:
            first.setdefault(r["tracklet"], r)
        table = list(first.values())
        pids = np.array([int(r["pid"]) for r in table])
        cameras = np.array([int(r["camera"]) for r in table])
        factors = {
            "panorama": [r["panorama"] for r in table],
            "jpeg_quality": [r["jpeg_quality"] for r in table],
            "size": [f"{r['height']}x{r['width']}" for r in table],
            "frame_base": [int(r["frame"]) // 100_000 for r in table],
            "box": [r["box"] for r in table],
        }
        for factor, values in factors.items():
            assert not leaks(pids, np.array(values), strata=cameras), (name, factor)
    # the check itself can fail: a factor derived from the pid is caught
    assert leaks(pids, pids % 5, strata=cameras)
    assert leaks(pair_pids, pair_pids % 3)


def image_statistics(path: Path) -> np.ndarray:
    """Per-channel mean and std, mean saturation, a Laplacian-variance blur measure, JPEG blockiness and a coarse
    3x3x3 colour histogram of one image."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
        saturation = np.asarray(image.convert("HSV"))[..., 1].mean() / 255.0
    x = rgb.astype(np.float64) / 255.0
    grey = x.mean(axis=2)
    laplacian = grey[1:-1, 1:-1] * 4 - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    column_steps = np.abs(np.diff(grey, axis=1))
    blockiness = column_steps[:, 7::8].mean() / (column_steps.mean() + 1e-6)
    cells = (rgb.astype(np.int64) * 3 // 256) @ np.array([9, 3, 1])
    histogram = np.bincount(cells.ravel(), minlength=27) / cells.size
    return np.concatenate([x.mean(axis=(0, 1)), x.std(axis=(0, 1)), [saturation, np.log(laplacian.var() + 1e-8),
                                                                     blockiness], np.sqrt(histogram)])


def softmax_regression_accuracy(features: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> float:
    """Train a multinomial logistic regression on a random half, return its accuracy on the other half."""
    order = rng.permutation(len(labels))
    train, test = order[: len(order) // 2], order[len(order) // 2:]
    mean, std = features[train].mean(0), features[train].std(0) + 1e-9
    x = np.hstack([(features - mean) / std, np.ones((len(features), 1))])
    classes = labels.max() + 1
    weights = np.zeros((x.shape[1], classes))
    onehot = np.eye(classes)[labels]
    for _ in range(500):
        logits = x[train] @ weights
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        weights -= 0.5 * x[train].T @ (probs - onehot[train]) / len(train)
    return float(((x[test] @ weights).argmax(1) == labels[test]).mean())


def test_domain_shift_is_real(root):
    """Cheap image statistics tell the four domains apart (measured 0.90-0.92 at this tiny scale and size, chance
    0.25; synth_msmt's 15 cameras overlap the others most): their camera styles and scenes differ."""
    rng = np.random.default_rng(0)
    features, labels = [], []
    for label, name in enumerate(DOMAIN_NAMES):
        paths = sorted(p for sub in FOLDERS.values() for p in (root / name / sub).iterdir())
        for path in rng.choice(paths, size=min(250, len(paths)), replace=False):
            features.append(image_statistics(path))
            labels.append(label)
    accuracy = softmax_regression_accuracy(np.array(features), np.array(labels), rng)
    assert accuracy > 0.85, accuracy


def test_gap_zero_removes_the_style_difference():
    """At --gap 0 every domain has the neutral camera; at 1 each has its own (domain means of brightness differ)."""
    def brightness(name, gap):
        return render_domain(name, scale=0.005, seed=SEED, gap=gap, size=SIZE).mean()

    full = [brightness(n, 1.0) for n in ("synth_market", "synth_duke")]
    neutral = [brightness(n, 0.0) for n in ("synth_market", "synth_duke")]
    assert abs(full[0] - full[1]) > 3 * abs(neutral[0] - neutral[1])


def test_contact_sheet_shows_four_ids_by_six_images(root):
    with Image.open(root / "synth_market" / "contact_sheet.png") as sheet:
        width, height = sheet.size
    assert width == 6 * (64 + 2) and height == 4 * (128 + 2)


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--domains", "synth_nowhere"]) == 2
    assert "unknown synthetic domain" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path), "--size", "big"]) == 2
    assert main(["data", "synth", "--out", str(tmp_path), "--size", "12x6"]) == 2
    assert "--size 12x6 is too small; use at least 16x8" in capsys.readouterr().err
    with pytest.raises(KdreidError, match="--size 12x6 is too small"):  # the Python entry point is checked too
        generate(tmp_path, ["synth_cuhk"], size=(12, 6))
    assert not any(tmp_path.iterdir())
    assert main(["data", "synth", "--out", str(tmp_path), "--gap", "1.5"]) == 2
    assert main(["data", "synth", "--out", str(tmp_path), "--gap", "-0.5"]) == 2
    assert "--gap -0.5 must be between 0 (no domain style) and 1" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path), "--seed", "-1"]) == 2
    assert "--seed -1 must be between 0 and 2**32 - 1" in capsys.readouterr().err
    with pytest.raises(KdreidError):
        build_domain("synth_msmt", scale=3.0, seed=0)  # more pids than 4 digits hold
    capsys.readouterr()
    afile = tmp_path / "afile"
    afile.write_text("")
    for out in (afile, afile / "below"):
        assert main(["data", "synth", "--out", str(out), "--domains", "synth_cuhk", "--scale", "0.01"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and str(afile) in err and "Traceback" not in err


def test_an_interrupted_write_leaves_the_previous_domain_and_nothing_half_written(tmp_path, monkeypatch):
    from kdreid.data.synthetic import writer

    generate(tmp_path, ["synth_cuhk"], scale=SCALE, seed=SEED, size=SIZE)
    before = (tmp_path / "synth_cuhk" / "truth.json").read_text()
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args)

    real = writer.write_chunk
    monkeypatch.setattr(writer, "write_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, ["synth_cuhk"], scale=0.02, seed=SEED, size=SIZE)  # a bigger domain, cut off
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, "synth_cuhk"]  # no partial folder left
    assert (tmp_path / "synth_cuhk" / "truth.json").read_text() == before
    assert build_dataset("synth_cuhk", str(tmp_path)).num_train_pids == json.loads(before)["train"]["ids"]


def synth(out, *more) -> list[str]:
    return ["data", "synth", "--out", str(out), "--scale", str(SCALE), "--size", "64x32", "--workers", "1", *more]


def test_sigterm_removes_the_domain_being_written_as_ctrl_c_does(tmp_path):
    """A batch system's time limit (SIGTERM) mid-write: the half-written domain is removed, the previous one stays,
    `kdreid: interrupted` and exit 143, as for Ctrl-C; not a hidden .partial folder (GBs at full size) left behind."""
    import subprocess
    import sys

    generate(tmp_path, ["synth_market"], scale=SCALE, seed=SEED, size=SIZE)
    before = (tmp_path / "synth_market" / "manifest.csv").read_bytes()
    code = (
        "import os, signal, sys\n"
        "from kdreid.cli import main\n"
        "from kdreid.data.synthetic import writer\n"
        "real = writer.write_chunk\n"
        "def write_chunk(domain, chunk, folder):\n"
        "    if chunk == 1:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(domain, chunk, folder)\n"
        "writer.write_chunk = write_chunk\n"
        f"sys.exit(main({synth(tmp_path, '--domains', 'synth_market', '--seed', '1')!r}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 128 + 15, (run.returncode, run.stderr)
    assert run.stderr.strip().splitlines() == ["kdreid: interrupted"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, "synth_market"]
    assert (tmp_path / "synth_market" / "manifest.csv").read_bytes() == before


@pytest.mark.parametrize("signal_name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stop_with_workers_is_one_line_from_the_parent_not_a_traceback_per_worker(tmp_path, signal_name, code):
    """--workers 2 stopped mid-chunk: a batch system's SIGTERM to the command, or Ctrl-C to the whole process group.
    The workers end quietly (a forked worker inherits the command's SIGTERM handler, and would get the Ctrl-C too);
    the parent says `kdreid: interrupted` once and removes the half-written domain."""
    import subprocess
    import sys

    kill = "os.kill(os.getppid(), signal.SIGTERM)" if signal_name == "SIGTERM" else \
        "os.killpg(os.getpgid(0), signal.SIGINT)"
    script = (
        "import os, signal, sys, time\n"
        "from kdreid.cli import main\n"
        "from kdreid.data.synthetic import writer\n"
        "real = writer.write_chunk\n"
        "def write_chunk(domain, chunk, folder):\n"
        "    if chunk == 1:\n"
        f"        {kill}\n"
        "        time.sleep(30)\n"
        "    return real(domain, chunk, folder)\n"
        "writer.write_chunk = write_chunk\n"
        f"sys.exit(main({synth(tmp_path, '--domains', 'synth_market', '--workers', '2')!r}))\n"  # 2 chunks
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         start_new_session=True)  # its own process group: the SIGINT reaches it, not pytest
    assert run.returncode == code, (run.returncode, run.stderr)
    assert run.stderr.strip().splitlines() == ["kdreid: interrupted"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]


def test_a_second_run_into_the_same_folder_is_refused_in_one_line(tmp_path, capsys):
    from tests.test_rundir import hold_in_another_process

    holder = hold_in_another_process(tmp_path)  # a first `kdreid data synth --out tmp_path` still writing
    try:
        assert main(synth(tmp_path, "--domains", "synth_cuhk")) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{tmp_path} is in use by another kdreid process (pid {holder.pid} " in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]  # the first run's folders untouched
    assert main(synth(tmp_path, "--domains", "synth_cuhk")) == 0  # free once the first run ends
    truth_ids = json.loads((tmp_path / "synth_cuhk" / "truth.json").read_text())["train"]["ids"]
    assert build_dataset("synth_cuhk", str(tmp_path)).num_train_pids == truth_ids  # the hidden lock file is no data


@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_disk_is_one_line_and_leaves_the_previous_domain(tmp_path, monkeypatch, capsys, workers):
    import errno

    generate(tmp_path, ["synth_cuhk"], scale=SCALE, seed=SEED, size=SIZE)
    before = (tmp_path / "synth_cuhk" / "truth.json").read_text()
    real = Path.write_bytes

    def full(path, data):
        if path.suffix == ".jpg":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(Path, "write_bytes", full)  # the image writes, in the pool's forked workers too
    more = ["--scale", "0.02", "--workers", str(workers)]  # 2 chunks: workers=2 writes in a pool
    assert main(synth(tmp_path, "--domains", "synth_cuhk", *more)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"cannot write {tmp_path / 'synth_cuhk'}: no space left on the device" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, "synth_cuhk"]  # the staging folder removed
    assert (tmp_path / "synth_cuhk" / "truth.json").read_text() == before


def test_staging_folders_of_killed_runs_are_removed(tmp_path):
    for name in ("synth_market", "synth_cuhk"):  # what SIGKILL leaves, of this domain and another
        stale = tmp_path / f".{name}.partial" / "bounding_box_train"
        stale.mkdir(parents=True)
        (stale / "0001_c1s1_000001_00.jpg").write_bytes(b"half")
    (tmp_path / ".market1501.partial").mkdir()  # another tool's, in a shared data root: not ours to remove
    generate(tmp_path, ["synth_cuhk"], scale=SCALE, seed=SEED, size=SIZE)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, ".market1501.partial", "synth_cuhk"]


def test_a_file_or_link_where_a_domain_goes_is_refused_before_rendering(tmp_path, monkeypatch, capsys):
    from kdreid.data import synthetic

    def no_rendering(*args, **kwargs):
        raise AssertionError("rendered before refusing")

    monkeypatch.setattr(synthetic, "build_domain", no_rendering)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    out = tmp_path / "data"
    out.mkdir()
    target = out / "synth_duke"
    for make, said in [(lambda: target.write_text("notes\n"), "it is a file"),
                       (lambda: target.symlink_to(elsewhere), f"it is a link (to {elsewhere})"),
                       (lambda: target.symlink_to(tmp_path / "nowhere"), "it is a link")]:
        make()
        # synth_market first: nothing of it is rendered either
        assert main(synth(out, "--domains", "synth_market", "synth_duke")) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert f"cannot write {target}: {said}" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "synth_duke"]  # nothing moved aside
        assert target.is_symlink() or target.read_text() == "notes\n"
        target.unlink()
    assert (elsewhere / "keep.txt").read_text() == "mine" and sorted(elsewhere.iterdir()) == [elsewhere / "keep.txt"]


def test_a_scale_too_large_for_one_domain_is_refused_before_any_domain_is_rendered(tmp_path, monkeypatch, capsys):
    """--scale 2.5 fits synth_cuhk but not synth_msmt's 4-digit pids: refused at once, not after synth_cuhk's
    35,000 images (hours at the default sizes), with the largest --scale that fits."""
    from kdreid.data import synthetic

    def no_rendering(*args, **kwargs):
        raise AssertionError("rendered before refusing")

    monkeypatch.setattr(synthetic, "_write_domain", no_rendering)
    out = tmp_path / "data"
    assert main(synth(out, "--domains", "synth_cuhk", "synth_msmt", "--scale", "2.5")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "synth_msmt at --scale 2.5 needs 10252 pids" in err and "use --scale 2.43 or less" in err
    assert not out.exists()
    build_domain("synth_msmt", scale=2.43, seed=0)  # the scale it names fits
    for scale in ("inf", "nan"):  # one line, not an OverflowError from round(inf)
        assert main(synth(out, "--domains", "synth_cuhk", "--scale", scale)) == 2
        err = capsys.readouterr().err
        assert f"--scale {scale} must be a number > 0" in err and "Traceback" not in err


def test_a_domain_named_twice_is_written_once(tmp_path, capsys):
    assert main(synth(tmp_path, "--domains", "synth_cuhk", "synth_cuhk")) == 0
    assert capsys.readouterr().out.count("synth_cuhk: train") == 1


def test_identity_rows_are_never_shared_between_splits(root):
    """A person (identity row of the manifest) belongs to one pid: train people, test people, distractors and junk
    are different people, or a test identity would be trained on."""
    for name in DOMAIN_NAMES:
        pids_of_row = defaultdict(set)
        for row in read_manifest(root / name):
            pids_of_row[row["identity"]].add(row["pid"])
        shared = {row: pids for row, pids in pids_of_row.items() if len(pids) > 1}
        assert not shared, (name, shared)
    # look-alikes exist (hard negatives: rows that copy an earlier row), each a person of its own
    rows = read_manifest(root / "synth_market")
    assert any(int(row["twin_of"]) >= 0 and int(row["pid"]) > 0 for row in rows)


def test_names_that_collide_get_the_next_box_index():
    from kdreid.data.synthetic.plan import _make_names_unique

    columns = {"pid": np.array([5, 5, 5, 6, 5]), "camid": np.array([1, 1, 1, 1, 2]), "seq": np.ones(5, int),
               "frame": np.array([10, 10, 10, 10, 10]), "box": np.array([1, 1, 2, 1, 1])}
    box = columns["box"].copy()
    _make_names_unique(columns)
    names = set(zip(*(columns[field].tolist() for field in ("pid", "camid", "seq", "frame", "box"))))
    # (5, c1, 10, box 1) three times: the 2nd and 3rd take the next free index, pushing the box-2 row on to 3
    assert len(names) == 5 and columns["box"].tolist() == [1, 2, 3, 1, 1] and (columns["box"] >= box).all()


def test_random_streams_do_not_depend_on_the_process():
    """Seeded from stable values: two interpreters with different string hashing draw the same numbers (Python's
    hash() of the domain name would differ between them)."""
    import subprocess
    import sys

    code = ("from kdreid.data.synthetic.plan import stream; "
            "print(stream(3, 'synth_duke', 2).integers(0, 2**31, 4).tolist())")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}) for seed in (1, 2)]
    assert all(run.returncode == 0 for run in runs), [run.stderr for run in runs]
    assert runs[0].stdout == runs[1].stdout


def test_pixels_do_not_depend_on_the_number_of_blas_threads():
    """The same seed gives the same pixels on a 2-core laptop and a 64-core server: the sensor's blur and colour
    mixing must not go through a threaded BLAS matmul, whose last bits (and so a few rounded pixels) change with
    the thread count (OMP_NUM_THREADS, the cores)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from kdreid.data.synthetic.camera import apply_sensor

    cameras = build_domain("synth_msmt", scale=SCALE, seed=SEED).cameras
    images = np.random.default_rng(0).random((256, 128, 64, 3), dtype=np.float32)
    which = np.arange(len(images)) % cameras.count

    def sensor(threads: int) -> np.ndarray:
        with threadpoolctl.threadpool_limits(threads):
            return apply_sensor(np.random.default_rng(1), images.copy(), which, np.ones(len(images), np.float32),
                                np.ones((len(images), 3), np.float32), cameras)

    one = sensor(1)
    for threads in (2, 3, 4):
        assert np.array_equal(sensor(threads), one), f"{threads} BLAS threads change the pixels"


def test_a_run_stopped_before_its_first_domain_leaves_no_folder_it_made(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) during the first domain into a new --out: no folder holding only the lock file is left,
    nor the parents the call made; a folder that existed before stays."""
    from kdreid.data.synthetic import writer

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "write_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "new" / "data", ["synth_cuhk"], scale=SCALE, seed=SEED, size=SIZE)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "kept", ["synth_cuhk"], scale=SCALE, seed=SEED, size=SIZE)
    assert (tmp_path / "kept").is_dir()



def test_a_run_stopped_after_its_first_domain_keeps_that_domain(tmp_path, monkeypatch):
    """Ctrl-C during the second domain into a new --out: the folder holds a finished domain, which stays (only a
    folder holding nothing of the run's is removed)."""
    from kdreid.data.synthetic import writer

    real_move, moved = writer.move_into_place, []

    def stopped_after_the_first(staging, target):
        if moved:
            raise KeyboardInterrupt
        real_move(staging, target)
        moved.append(target)

    monkeypatch.setattr(writer, "move_into_place", stopped_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "new", ["synth_cuhk", "synth_duke"], scale=SCALE, seed=SEED, size=SIZE)
    assert moved == [tmp_path / "new" / "synth_cuhk"] and (tmp_path / "new" / "synth_cuhk").is_dir()
    assert any((tmp_path / "new" / "synth_cuhk").rglob("*.jpg"))


def test_the_sensors_blur_and_colour_mixing_are_the_matrix_products_they_stand_for():
    """The fixed-order loops of the sensor (per-diagonal blur, per-channel colour mixing) compute what the dense
    products they replaced did: pixel @ colour.T, then rows @ image @ cols.T with each axis' resample_blur_matrix
    (blur given at 128 px height); a float64 reference, so only rounding may move a pixel by one level."""
    from dataclasses import replace

    from kdreid.data.synthetic.camera import apply_sensor, resample_blur_matrix

    height, width = 48, 24
    style = build_domain("synth_duke", scale=SCALE, seed=SEED).cameras
    c = style.count
    rng = np.random.default_rng(0)
    colour = (0.6 * np.eye(3) + rng.uniform(0.0, 0.13, (c, 3, 3))).astype(np.float32)  # rows sum below 1
    ones, zeros = np.ones(c, np.float32), np.zeros(c, np.float32)
    resolution = np.resize(np.array([1.0, 0.5, 0.35, 0.8], np.float32), c)
    blur = np.resize(np.array([0.0, 2.0, 1.0, 3.0], np.float32), c)
    neutral = replace(style, gain=ones, colour=colour, gamma=ones, contrast=ones, saturation=ones, haze=zeros,
                      light_ramp=zeros, resolution=resolution, blur=blur, noise=zeros)
    images = rng.uniform(0.05, 0.95, (2 * c, height, width, 3)).astype(np.float32)
    cameras = np.arange(len(images)) % c
    out = apply_sensor(np.random.default_rng(1), images.copy(), cameras, np.ones(len(images), np.float32),
                       np.ones((len(images), 3), np.float32), neutral)

    for i, camera in enumerate(cameras):
        sigma = float(blur[camera]) * height / 128
        rows = resample_blur_matrix(height, float(resolution[camera]), sigma).astype(np.float64)
        cols = resample_blur_matrix(width, float(resolution[camera]), sigma).astype(np.float64)
        mixed = images[i].astype(np.float64) @ colour[camera].astype(np.float64).T  # (H, W, 3)
        filtered = np.einsum("hk,kwc,vw->hvc", rows, mixed, cols)
        expected = np.clip(filtered, 0.0, 1.0) * 255.0 + 0.5
        difference = np.abs(out[i].astype(np.int64) - np.floor(expected).astype(np.int64))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01, (camera, difference.max())


@pytest.mark.parametrize("n, resolution", [(64, 0.5), (48, 0.35), (32, 0.8)])
def test_the_resampling_operator_blurs_after_resampling(n, resolution):
    """resample_blur_matrix's docstring: down-sampling, up-sampling, *then* the blur (at resolution 1 the operator
    is the blur alone), each row summing to 1."""
    from kdreid.data.synthetic.camera import resample_blur_matrix

    resampled = resample_blur_matrix(n, resolution, 0.0).astype(np.float64)
    for sigma in (0.8, 2.0):
        blur = resample_blur_matrix(n, 1.0, sigma).astype(np.float64)
        operator = resample_blur_matrix(n, resolution, sigma).astype(np.float64)
        assert np.allclose(operator, blur @ resampled, atol=1e-6)
        assert np.allclose(operator.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(resampled.sum(axis=1), 1.0, atol=1e-5)
