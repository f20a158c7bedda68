"""`kdreid evaluate` end to end: a tiny Market-layout dataset and a tiny model checkpoint."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdreid.cli import main
from kdreid.data.datasets.base import build_dataset
from kdreid.evaluation.features import evaluate_model, load_model
from kdreid.models import build_model, save_checkpoint

REPO = Path(__file__).resolve().parents[2]

HEIGHT, WIDTH = 32, 16


def write_market(root, num_ids=6, seed=0, lonely_queries=0):
    """root/market1501 with per-identity colours (so even an untrained model ranks well), two cameras."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (num_ids + 1 + lonely_queries, 3))
    layout = {"bounding_box_train": [(pid, cam) for pid in range(1, num_ids + 1) for cam in (1, 2)],
              "query": [(pid, 1) for pid in range(1, num_ids + 1 + lonely_queries)],
              "bounding_box_test": [(pid, cam) for pid in range(1, num_ids + 1) for cam in (1, 2, 2)] + [(0, 1)] * 3}
    for folder, items in layout.items():
        (root / "market1501" / folder).mkdir(parents=True)
        for frame, (pid, cam) in enumerate(items):
            pixels = colours[pid] + rng.normal(0, 90, (HEIGHT, WIDTH, 3))
            image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
            image.save(root / "market1501" / folder / f"{pid:04d}_c{cam}s1_{frame:06d}_01.jpg")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_market(root)
    torch.manual_seed(0)
    model = build_model("resnet_tiny", num_classes=6).eval()
    folder = tmp_path_factory.mktemp("model")
    checkpoint = save_checkpoint(folder / "model.pt", model, extra={"input_size": [HEIGHT, WIDTH]})
    torch.save(model.state_dict(), folder / "plain.pth")
    return root, checkpoint, folder / "plain.pth"


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_equals_evaluate_model_and_metrics_file_is_written(setup, tmp_path, capsys):
    root, checkpoint, _ = setup
    code, out, err = run(["evaluate", "--model", str(checkpoint), "-t", "market1501", "--root", str(root),
                          "--out", str(tmp_path / "run"), "--json", "--device", "cpu", "--flip"], capsys)
    assert code == 0, err
    printed = json.loads(out)["final"]["market1501"]
    expected = evaluate_model(load_model(checkpoint), build_dataset("market1501", root), flip=True, device="cpu",
                              height=HEIGHT, width=WIDTH).summary()
    assert set(printed) == {"mAP", "rank1", "rank5", "rank10", "rank20", "mINP"}
    for key, value in expected.items():
        assert printed[key] == pytest.approx(value, abs=1e-3)
    assert printed["mAP"] > 50  # the colours make identities easy: the pipeline is not scrambling labels
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["final"]["market1501"] == printed
    assert written["evaluated_with"]["market1501"]["flip"] is True


def test_table_rows_plain_state_dict_and_merge(setup, tmp_path, capsys):
    root, checkpoint, plain = setup
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"history": [1, 2], "final": {"other": {"mAP": 1.0}}}))
    code, out, err = run(["evaluate", "--model", str(plain), "-a", "resnet_tiny", "-t", "market1501",
                          "--root", str(root), "--height", str(HEIGHT), "--width", str(WIDTH), "--out", str(run_dir),
                          "--metric", "cosine", "--rerank", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "kdreid: loaded " in err and f"from {plain}" in err  # what the plain file gave the model
    header, row = out.strip().splitlines()
    assert header.split() == ["target", "mAP", "R1", "R5", "R10", "R20", "mINP"]
    assert row.split()[0] == "market1501" and len(row.split()) == 7
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["history"] == [1, 2] and set(written["final"]) == {"other", "market1501"}
    assert written["evaluated_with"]["market1501"]["metric"] == "cosine"

    # A file from before recorded one set of settings for all its targets (protocol per target): spread, not lost.
    written["evaluated_with"] = {"model": "old.pt", "metric": "euclidean", "rerank": False, "flip": False,
                                 "protocol": {"other": "market"}}
    (run_dir / "metrics.json").write_text(json.dumps(written))
    assert run(["evaluate", "--model", str(plain), "-a", "resnet_tiny", "-t", "market1501", "--root", str(root),
                "--height", str(HEIGHT), "--width", str(WIDTH), "--out", str(run_dir), "--device", "cpu"],
               capsys)[0] == 0
    settings = json.loads((run_dir / "metrics.json").read_text())["evaluated_with"]
    assert settings["other"] == {"model": "old.pt", "metric": "euclidean", "rerank": False, "flip": False,
                                 "protocol": "market"}
    assert settings["market1501"]["model"] == str(plain.absolute()) and settings["market1501"]["metric"] == "euclidean"
    expected = evaluate_model(load_model(checkpoint), build_dataset("market1501", root), metric="cosine",
                              rerank=True, device="cpu", height=HEIGHT, width=WIDTH).summary()
    assert float(row.split()[1]) == pytest.approx(expected["mAP"], abs=0.051)


def test_the_input_size_is_recorded_and_tells_evaluations_apart(setup, tmp_path, capsys):
    # Found by a review: --height/--width change the numbers but were not recorded in evaluated_with, so `kdreid
    # aggregate` averaged evaluations at two input sizes without a word (and the report did not say the size).
    from kdreid.aggregate import aggregate_runs

    root, checkpoint, _ = setup
    for name, size in (("a", []), ("b", ["--height", "64", "--width", "32"])):
        code, _, err = run(["evaluate", "--model", str(checkpoint), "-t", "market1501", "--root", str(root),
                            "--out", str(tmp_path / name), "--device", "cpu", *size], capsys)
        assert code == 0, err
    recorded = json.loads((tmp_path / "a" / "metrics.json").read_text())["evaluated_with"]["market1501"]
    assert (recorded["height"], recorded["width"]) == (HEIGHT, WIDTH)  # the checkpoint's own size
    assert aggregate_runs([tmp_path / "a", tmp_path / "b"]).differing == {
        "market1501.height": [HEIGHT, 64], "market1501.width": [WIDTH, 32]}


def test_the_data_evaluated_on_is_recorded_and_tells_evaluations_apart(setup, tmp_path, capsys):
    # Evaluations of one model on other files under one dataset name (data regenerated, another seed of `kdreid
    # data synth`) were averaged by `kdreid aggregate` without a word. The same files in another folder are the
    # same data; a training image replaced is not what an evaluation measured on.
    import shutil

    from kdreid.aggregate import aggregate_runs

    root, checkpoint, _ = setup
    copy, other = tmp_path / "copy", tmp_path / "other"
    shutil.copytree(root, copy)
    write_market(other, seed=1)
    for image in (copy / "market1501" / "bounding_box_train").iterdir():  # the same names, other pixels
        shutil.copyfile(other / "market1501" / "bounding_box_train" / image.name, image)
    for name, data in (("a", root), ("b", copy), ("c", other)):
        code, _, err = run(["evaluate", "--model", str(checkpoint), "-t", "market1501", "--root", str(data),
                            "--out", str(tmp_path / name), "--device", "cpu"], capsys)
        assert code == 0, err
    assert aggregate_runs([tmp_path / "a", tmp_path / "b"]).differing == {}
    recorded = [json.loads((tmp_path / name / "metrics.json").read_text())["evaluated_with"]["market1501"]["data"]
                for name in "ac"]
    assert aggregate_runs([tmp_path / "a", tmp_path / "c"]).differing == {"market1501.data": recorded}
    assert recorded[0] != recorded[1]


def test_user_mistakes_are_one_line(setup, capsys):
    root, _, plain = setup
    code, _, err = run(["evaluate", "--model", str(plain), "-t", "market1501", "--root", str(root)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "-a ARCH" in err
    code, _, err = run(["evaluate", "--model", str(plain), "-a", "resnet_tiny", "-t", "nosuchset", "--root",
                        str(root)], capsys)
    assert code == 2 and "unknown dataset" in err and len(err.strip().splitlines()) == 1


def test_out_must_be_a_folder_of_its_own_not_a_training_run(setup, tmp_path, capsys):
    """Checked before the evaluation: a stage's folder keeps its own metrics.json (a pipeline reusing the stage
    reports it), and a file cannot hold metrics.json."""
    root, checkpoint, _ = setup
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "model.pt").write_bytes(checkpoint.read_bytes())
    (stage / "metrics.json").write_text('{"final": {"market1501": {"mAP": 12.5}}}')
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for out, message in ((stage, f"is a training run's folder (it holds model.pt), whose metrics.json is the "
                                 f"run's own: write the evaluation beside it, e.g. --out {stage / 'evaluation'}"),
                         (a_file, "is a file, not a folder; choose another --out")):
        code, _, err = run(["evaluate", "--model", str(checkpoint), "-t", "market1501", "--root", str(root),
                            "--out", str(out), "--device", "cpu"], capsys)
        assert code == 2 and err.strip().splitlines() == [f"kdreid: error: --out {out} {message}"]
    assert json.loads((stage / "metrics.json").read_text())["final"]["market1501"]["mAP"] == 12.5
    assert a_file.read_text() == "x"


def test_an_out_folder_another_evaluation_writes_is_refused_in_one_line(setup, tmp_path, capsys):
    """Two `evaluate --out` into one folder at once: the second removed the first's staged pictures as it began (the
    first then failed with a traceback after writing its metrics.json), and each merged its targets into the
    metrics.json it had read, losing the other's. The second is refused, naming the first."""
    from kdreid.rundir import LOCK_FILE
    from tests.test_rundir import hold_in_another_process

    root, checkpoint, _ = setup
    out = tmp_path / "eval"
    staged = out / ".evaluate.new" / "visrank" / "market1501_01.png"  # the other evaluation's, being drawn
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"png")
    (out / "metrics.json").write_text('{"final": {"dukemtmcreid": {"mAP": 12.5}}}')
    holder = hold_in_another_process(out)
    try:
        code, _, err = run(["evaluate", "--model", str(checkpoint), "-t", "market1501", "--root", str(root),
                            "--out", str(out), "--visrank", "2", "--device", "cpu"], capsys)
    finally:
        holder.kill()
        holder.wait()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"kdreid: error: {out} is in use by another kdreid process (pid {holder.pid} on ")
    assert staged.read_bytes() == b"png" and not (out / "visrank").exists()
    assert json.loads((out / "metrics.json").read_text()) == {"final": {"dukemtmcreid": {"mAP": 12.5}}}
    # A call that fails in a folder it made leaves no folder behind, lock file included.
    code, _, err = run(["evaluate", "--model", str(tmp_path / "missing.pt"), "-t", "market1501", "--root", str(root),
                        "--out", str(tmp_path / "new"), "--device", "cpu"], capsys)
    assert code == 2 and not (tmp_path / "new").exists(), err
    code, _, err = run(["evaluate", "--model", str(checkpoint), "-t", "market1501", "--root", str(root),
                        "--out", str(tmp_path / "new"), "--device", "cpu"], capsys)
    assert code == 0 and sorted(p.name for p in (tmp_path / "new").iterdir()) == [LOCK_FILE, "metrics.json"], err


def test_skipped_queries_are_a_warning_line(tmp_path, capsys, setup):
    _, checkpoint, _ = setup
    write_market(tmp_path, lonely_queries=2)  # two query identities absent from the gallery
    code, out, err = run(["evaluate", "--model", str(checkpoint), "-t", "market1501", "--root", str(tmp_path),
                          "--json", "--device", "cpu"], capsys)
    assert code == 0
    assert "kdreid: warning: market1501: 2 of 8 queries have no true match" in err
    assert json.loads(out)["final"]["market1501"]["mAP"] is not None


def test_a_state_dict_of_another_architecture_is_refused(setup, tmp_path, capsys):
    """osnet_tiny's tensors partly fit osnet_x0_25 (by name and shape): scoring that mix would print an mAP of
    a half-initialised model, so it is refused in one line naming the fix."""
    root, _, _ = setup
    plain = tmp_path / "osnet_tiny.pth"
    torch.save(build_model("osnet_tiny", 0).state_dict(), plain)
    code, out, err = run(["evaluate", "--model", str(plain), "-a", "osnet_x0_25", "-t", "market1501", "--root",
                          str(root), "--device", "cpu"], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "backbone tensors are missing" in err and "pass the right -a" in err


@pytest.mark.parametrize("flags, expected", [
    (["--cuhk03-classic-split"], {"market1501": "market", "cuhk03": "cuhk03"}),  # as the training stages
    ([], {"market1501": "market", "cuhk03": "market"}),  # CUHK03's new 767/700 protocol is scored like Market
    (["--cuhk03-classic-split", "--protocol", "market"], {"market1501": "market", "cuhk03": "market"}),
    (["--protocol", "cuhk03"], {"market1501": "cuhk03", "cuhk03": "cuhk03"}),  # an explicit choice is for all
])
def test_protocol_is_chosen_per_target_as_the_stages_do(setup, tmp_path, capsys, monkeypatch, flags, expected):
    from kdreid.data.datasets import base
    from kdreid.evaluation import features
    from kdreid.stages.common import DataOptions, protocol_for

    root, checkpoint, _ = setup
    market = build_dataset("market1501", root)
    real_build = base.build_dataset
    # A CUHK03 classic split needs the raw .mat; the Market images stand in for its query and gallery.
    monkeypatch.setattr(base, "build_dataset", lambda name, *a, **kw: market if name == "cuhk03" else
                        real_build(name, *a, **kw))
    scored = []
    real_evaluate = features.evaluate
    monkeypatch.setattr(features, "evaluate", lambda *a, protocol, **kw: scored.append(protocol) or
                        real_evaluate(*a, protocol=protocol, **kw))
    code, out, err = run(["evaluate", "--model", str(checkpoint), "-t", "market1501", "cuhk03", "--root", str(root),
                          "--out", str(tmp_path), "--json", "--device", "cpu", *flags], capsys)
    assert code == 0, err
    assert scored == list(expected.values())
    if "--protocol" not in flags:
        stages = DataOptions(cuhk03_classic_split="--cuhk03-classic-split" in flags)
        assert expected == {target: protocol_for(target, stages) for target in expected}
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert {target: written["evaluated_with"][target]["protocol"] for target in expected} == expected
    cuhk03 = evaluate_model(load_model(checkpoint), market, protocol=expected["cuhk03"], device="cpu",
                            height=HEIGHT, width=WIDTH).summary()
    assert json.loads(out)["final"]["cuhk03"]["rank1"] == pytest.approx(cuhk03["rank1"], abs=1e-3)


@pytest.mark.parametrize("flags, split", [
    ([], "detected boxes of the 767/700 protocol"),
    (["--cuhk03-labeled"], "labeled boxes of the 767/700 protocol"),
    (["--cuhk03-classic-split", "--split-id", "3"], "detected boxes of classic split 3"),
])
def test_the_cuhk03_boxes_and_split_are_named_and_recorded(setup, tmp_path, capsys, monkeypatch, flags, split):
    # Labeled and detected boxes, or two splits, give other numbers under the same protocol: an evaluation folder
    # (and `aggregate`, `report` reading it) must say which one its cuhk03 numbers are.
    from kdreid.data.datasets import base

    root, checkpoint, _ = setup
    market = build_dataset("market1501", root)
    real_build = base.build_dataset
    monkeypatch.setattr(base, "build_dataset", lambda name, *a, **kw: market if name == "cuhk03" else
                        real_build(name, *a, **kw))  # the Market images stand in for CUHK03's
    code, _, err = run(["evaluate", "--model", str(checkpoint), "-t", "market1501", "cuhk03", "--root", str(root),
                        "--out", str(tmp_path), "--device", "cpu", *flags], capsys)
    assert code == 0, err
    assert f"cuhk03 ({split}): 6 queries" in err
    assert "market1501: 6 queries" in err
    recorded = json.loads((tmp_path / "metrics.json").read_text())["evaluated_with"]
    assert recorded["cuhk03"]["split"] == split and "split" not in recorded["market1501"]


def test_a_model_trained_on_the_targets_test_images_is_named(setup, tmp_path, capsys):
    # --combineall trains a source on its query and gallery: the stage does not evaluate it there, and neither may
    # `kdreid evaluate` without saying that those numbers are recall of training images.
    root, _, _ = setup
    torch.manual_seed(0)
    model = build_model("resnet_tiny", num_classes=6)
    for combineall, warned in ((True, True), (False, False)):
        checkpoint = save_checkpoint(tmp_path / f"model_{combineall}.pt", model, datasets=["market1501"],
                                     config={"sources": ["market1501"], "data": {"combineall": combineall}},
                                     extra={"input_size": [HEIGHT, WIDTH]})
        code, _, err = run(["evaluate", "--model", str(checkpoint), "-t", "market1501", "--root", str(root),
                            "--device", "cpu"], capsys)
        assert code == 0, err
        warnings = [line for line in err.splitlines() if line.startswith("kdreid: warning:")]
        assert warnings == ([f"kdreid: warning: {checkpoint} trained on market1501's query and gallery images too "
                             "(--combineall): its numbers on market1501 measure recall of training images, not "
                             "re-identification (the training stage did not evaluate it)"] if warned else [])


def test_a_distance_matrix_too_large_for_memory_is_refused_with_its_size():
    # 10^6 x 10^6 float32 distances are 4 TB: one line with the size, not the allocator's traceback (or the OOM
    # killer, where the system overcommits).
    from kdreid.errors import EvaluationError
    from kdreid.evaluation.features import Features, evaluate_features

    def features(count, pid):
        return Features(torch.zeros(count, 1), np.full(count, pid), np.full(count, pid), [""] * count)

    with pytest.raises(EvaluationError, match=r"^1000000 queries x 1000000 gallery images: the evaluation needs "
                                              r"4000\.1 GB \(the query-gallery distance matrix alone 4000\.0 GB\), "
                                              r"but cpu has [0-9.]+ GB free; evaluate on a machine with more memory$"):
        evaluate_features(features(10**6, 1), features(10**6, 2), device="cpu")


def test_the_refusal_counts_what_the_evaluation_holds_beside_the_matrix(monkeypatch):
    # The matrix alone was counted: re-ranking at MSMT17 size took 18 % more, cosine distances of 2048-d features
    # 15 % more, so a machine with just the matrix's room passed the check and ran out.
    import kdreid.evaluation.features as module

    msmt = (11659, 82161)
    matrix = 4 * msmt[0] * msmt[1]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # CPU chunks are ranked one per thread
    monkeypatch.setattr(module, "free_memory", lambda device: matrix + 150 * 2**20)
    module.check_room_for_evaluation(*msmt, 512, torch.device("cpu"))  # euclidean, 512-d: the matrix and a chunk
    for options, needed in (({"metric": "cosine"}, "4.7"), ({"normalize": True}, "4.7"), ({"rerank": True}, "6.8")):
        what = "the evaluation with re-ranking" if options.get("rerank") else "the evaluation"
        with pytest.raises(module.EvaluationError, match=rf"^11659 queries x 82161 gallery images: {what} needs "
                                                         rf"{needed} GB \(the query-gallery distance matrix alone "
                                                         r"3\.8 GB\), but cpu has 4\.0 GB free;"):
            module.check_room_for_evaluation(*msmt, 2048, torch.device("cpu"), **options)
    # On a GPU the features' copy there counts, and the chunks ranked there are larger (1.3 GB).
    monkeypatch.setattr(module, "free_memory", lambda device: matrix + 2**30)
    with pytest.raises(module.EvaluationError, match=r"needs 5\.4 GB .* cuda has 4\.9 GB free; evaluate on the CPU"):
        module.check_room_for_evaluation(*msmt, 512, torch.device("cuda"), copied=True)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists() or platform.libc_ver()[0] != "glibc",
                    reason="measured through Linux's /proc and glibc's MALLOC_MMAP_THRESHOLD_")
@pytest.mark.parametrize("case", [("1500", "20000", "64", "euclidean", "0", "0"),
                                  ("1500", "20000", "512", "cosine", "1", "0"),
                                  ("600", "4000", "256", "euclidean", "0", "1")])
def test_the_estimate_bounds_an_evaluations_measured_peak(case):
    # The peak of the live tensors, measured in a process of its own with freed buffers given back at once: within
    # the estimate (a refusal never comes late) and not far above it (nor too early). bench/evaluation_memory.py
    # measures Market size the same way.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "evaluation_memory.py"), "--child", *case],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    peak, estimate = (int(value) for value in done.stdout.split()[-2:])
    assert peak <= estimate <= 1.7 * peak + 64 * 2**20, (peak, estimate)


@pytest.mark.parametrize("layout", ["v2", "v1"])
def test_free_memory_sees_the_limit_of_a_batch_jobs_own_cgroup(layout, tmp_path, monkeypatch):
    # Found by a review: only /sys/fs/cgroup/memory.max (a cgroup v2 container's own) was read. A Slurm job or a
    # systemd unit has its limit on its own group (or a parent), named in /proc/self/cgroup, and cgroup v1 keeps
    # it in memory/memory.limit_in_bytes: there the node's whole free memory was taken for the room, and a matrix
    # or an image cache over the job's limit met the OOM killer instead of the one-line refusal.
    from kdreid.evaluation import features as module

    gb = 10**9
    (tmp_path / "meminfo").write_text(f"MemTotal: {64 * gb // 1024} kB\nMemAvailable: {50 * gb // 1024} kB\n")
    mount = tmp_path / "cgroup" / ("memory" if layout == "v1" else "")
    job, step = mount / "slurm" / "job_7", mount / "slurm" / "job_7" / "step_0"
    step.mkdir(parents=True)
    names = (("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file") if layout == "v1" else
             ("memory.max", "memory.current", "inactive_file"))
    unlimited = str(2**63 - 4096) if layout == "v1" else "max"
    for folder, limit, used in ((mount, unlimited, 20 * gb), (job, str(8 * gb), 3 * gb), (step, unlimited, 3 * gb)):
        (folder / names[0]).write_text(f"{limit}\n")
        (folder / names[1]).write_text(f"{used}\n")
        (folder / "memory.stat").write_text(f"anon {used}\n{names[2]} {gb}\n")
    own = "4:memory:/slurm/job_7/step_0\n0::/\n" if layout == "v1" else "0::/slurm/job_7/step_0\n"
    (tmp_path / "self_cgroup").write_text(own)
    monkeypatch.setattr(module, "_MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(module, "_CGROUP_ROOT", tmp_path / "cgroup")
    monkeypatch.setattr(module, "_SELF_CGROUP", tmp_path / "self_cgroup")
    # The job's 8 GB less its 3 GB in use, of which 1 GB is page cache the kernel gives back: 6 GB, not the node's 50.
    assert module.free_memory(torch.device("cpu")) == 6 * gb
    # A limit on the own group (a step's, a systemd unit's MemoryMax) counts as well: the least room of them all.
    for limit, room in ((5 * gb, 3 * gb), (10 * gb, 6 * gb)):  # the step's 5 (or 10) GB less its 2 GB: 3 (or 8)
        (step / names[0]).write_text(f"{limit}\n")
        assert module.free_memory(torch.device("cpu")) == room
    (step / names[0]).write_text(f"{unlimited}\n")
    # Nor more than the machine has available, whatever the limits leave.
    (tmp_path / "meminfo").write_text(f"MemTotal: {64 * gb // 1024} kB\nMemAvailable: {2 * gb // 1024} kB\n")
    assert module.free_memory(torch.device("cpu")) == 2 * gb
    (tmp_path / "meminfo").write_text(f"MemTotal: {64 * gb // 1024} kB\nMemAvailable: {50 * gb // 1024} kB\n")
    (tmp_path / "self_cgroup").write_text("0::/\n")  # a container's own namespace: its limit is at the root
    (mount / names[0]).write_text(f"{30 * gb}\n")
    assert module.free_memory(torch.device("cpu")) == 11 * gb
    with pytest.raises(module.EvaluationError, match=r"needs 40\.\d GB \(.*\), but cpu has 11\.0 GB free"):
        module.check_room_for_evaluation(100_000, 100_000, 512, torch.device("cpu"))


@pytest.mark.parametrize("trained, flags, warned", [
    ({"cuhk03_classic_split": True, "cuhk03_split_id": 3}, ["--cuhk03-classic-split", "--split-id", "3"], None),
    ({"cuhk03_classic_split": True, "cuhk03_split_id": 3}, ["--cuhk03-classic-split"],
     "trained on CUHK03 images of the classic split 3, evaluated on the classic split 0: its test persons may be "
     "training persons of the model; evaluate on the run's own split (--cuhk03-classic-split --split-id 3)"),
    ({}, ["--cuhk03-classic-split", "--split-id", "1"],
     "trained on CUHK03 images of the new protocol, evaluated on the classic split 1: its test persons may be "
     "training persons of the model; evaluate on the run's own split (no --cuhk03-classic-split)"),
])
def test_a_model_trained_on_another_cuhk03_split_is_named(setup, tmp_path, capsys, monkeypatch, trained, flags,
                                                          warned):
    # The test persons of one CUHK03 split are training persons of the others: those numbers would be void.
    from kdreid.data.datasets import base

    root, _, _ = setup
    market = build_dataset("market1501", root)
    monkeypatch.setattr(base, "build_dataset", lambda name, *a, **kw: market)  # stands in for a CUHK03 split
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "model.pt", build_model("resnet_tiny", num_classes=6), datasets=["cuhk03"],
                                 config={"data": trained}, extra={"input_size": [HEIGHT, WIDTH]})
    code, _, err = run(["evaluate", "--model", str(checkpoint), "-t", "cuhk03", "--root", str(root), "--device",
                        "cpu", *flags], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("kdreid: warning:")]
    assert warnings == ([f"kdreid: warning: {checkpoint} {warned}"] if warned else [])


@pytest.mark.parametrize("fmt, suffix", [("onnx", "onnx"), ("torchscript", "pt")])
def test_an_exported_model_scores_as_its_checkpoint(setup, tmp_path, capsys, fmt, suffix):
    # The deployed file's own numbers: run as `kdreid extract` runs it, they equal the checkpoint's.
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    root, checkpoint, _ = setup
    exported = tmp_path / f"model.{suffix}"
    assert main(["export", "--model", str(checkpoint), "--format", fmt, "--out", str(exported)]) == 0
    capsys.readouterr()
    flags = ["-t", "market1501", "--root", str(root), "--json", "--flip", "--verification"]
    code, out, err = run(["evaluate", "--model", str(checkpoint), "--device", "cpu", *flags], capsys)
    assert code == 0, err
    code, exported_out, err = run(["evaluate", "--model", str(exported), "-a", "resnet_tiny", *flags, "--out",
                                   str(tmp_path / "evaluation")], capsys)
    assert code == 0 and "-a has no effect" in err
    # the size the exported file takes (its own, recorded at export) is the size its numbers were measured at
    recorded = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())["evaluated_with"]["market1501"]
    assert (recorded["height"], recorded["width"]) == (HEIGHT, WIDTH)
    expected, measured = json.loads(out), json.loads(exported_out)
    for key, value in expected["final"]["market1501"].items():
        assert measured["final"]["market1501"][key] == pytest.approx(value, abs=0.05), key
    assert measured["verification"]["market1501"]["auc"] == pytest.approx(
        expected["verification"]["market1501"]["auc"], abs=1e-3)


def test_an_exported_model_on_cuhk03_says_its_split_cannot_be_checked(setup, tmp_path, capsys, monkeypatch):
    from kdreid.data.datasets import base

    root, checkpoint, _ = setup
    market = build_dataset("market1501", root)
    monkeypatch.setattr(base, "build_dataset", lambda name, *a, **kw: market)  # stands in for a CUHK03 split
    exported = tmp_path / "model.pt"
    assert main(["export", "--model", str(checkpoint), "--format", "torchscript", "--out", str(exported)]) == 0
    code, _, err = run(["evaluate", "--model", str(exported), "-t", "cuhk03", "--root", str(root)], capsys)
    assert code == 0 and "does not record the CUHK03 split it was trained on" in err


def test_a_damaged_torchscript_file_is_one_line(setup, tmp_path, capsys):
    import zipfile

    root, checkpoint, _ = setup
    exported = tmp_path / "model.pt"
    assert main(["export", "--model", str(checkpoint), "--format", "torchscript", "--out", str(exported)]) == 0
    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(exported) as source, zipfile.ZipFile(damaged, "w") as target:
        for item in source.infolist():  # the archive whole, its pickled module cut in half
            data = source.read(item)
            target.writestr(item, data[:len(data) // 2] if item.filename.endswith("data.pkl") else data)
    capsys.readouterr()
    code, _, err = run(["evaluate", "--model", str(damaged), "-t", "market1501", "--root", str(root)], capsys)
    assert code == 2 and "is not a loadable TorchScript file" in err and "Traceback" not in err


def test_visrank_topk_without_visrank_is_named(setup, capsys):
    root, checkpoint, _ = setup
    code, _, err = run(["evaluate", "--model", str(checkpoint), "-t", "market1501", "--root", str(root),
                        "--visrank-topk", "3", "--json", "--device", "cpu"], capsys)
    assert code == 0 and "warning: --visrank-topk has no effect without --visrank N" in err
