"""`kdreid report RUN`: the page and its pictures for a pipeline run, a single stage and an evaluation folder, its
one-line refusals, and (with Chromium) that the page renders and every picture in it loads.

The run folders are written by the test with the writers the stages use (`write_results`, the pipeline's
metrics keys, the adapt stage's distance files): a real tiny stage run takes a minute or more on 2 shared cores.
"""

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from kdreid.cli import main
from kdreid.report import build_report, markdown_to_html
from kdreid.rundir import RunDir
from kdreid.stages.common import ResultRow, write_results
from kdreid.stages.loop import FitResult
from tests.viz.fixtures import tiny_domain, tiny_model  # noqa: F401  (fixtures)

TARGET = "synth_duke"


def _stage(folder: Path, label: str, *, histograms: bool, rng) -> None:
    """A finished stage folder as the stages write it: config.yaml, metrics.json, results.md, distances."""
    run = RunDir(folder)
    final = {TARGET: {"mAP": 20.0, "rank1": 30.0, "rank5": 50.0, "rank10": 60.0, "mINP": 5.0}}
    epochs = [{"epoch": e, "lr": 1e-4, "losses": {"loss": 5.0 - e, "ce": 3.0 - e / 2}, "seconds": 1.0,
               "metrics": {TARGET: {**final[TARGET], "mAP": 10.0 * e}}} for e in (1, 2)]
    write_results(run, FitResult(final, epochs, "last epoch", 2), [ResultRow(label, TARGET, final[TARGET])])
    (folder / "config.yaml").write_text(yaml.safe_dump({"sources": ["synth_msmt"], "targets": [TARGET],
                                                        "data": {"root": "nowhere"}}))
    if histograms:
        for moment in ("before", "after"):
            np.savez_compressed(folder / f"distances_{moment}.npz", **{
                key: rng.gamma(2.0, 1.0, 40) for key in
                ("source_within", "source_between", "target_within", "target_between")})
    if label == "distill":  # the teacher-vs-student distances
        for moment in ("before", "after"):
            teacher = rng.uniform(0, 1, 45)
            np.savez_compressed(folder / f"kd_distances_{moment}.npz", targets=np.array([TARGET]), t0_teacher=teacher,
                                t0_student=teacher + rng.normal(0, 0.1, 45), t0_same=rng.uniform(0, 1, 45) < 0.2)


@pytest.fixture
def pipeline_run(tmp_path, tiny_domain, tiny_model, rng):
    """A finished pipeline run folder and its report."""
    run = tmp_path / "pipe"
    stages = {"source_resnet_tiny": False, "source_osnet_tiny": False, f"teacher_{TARGET}": True, "blend": True,
              "distill": False}
    for name, histograms in stages.items():
        _stage(run / "stages" / name, name, histograms=histograms, rng=rng)
    row = {TARGET: {"mAP": 20.0, "rank1": 30.0}}
    (run / "metrics.json").write_text(json.dumps({
        "source_only": row, "source_only_student": row, "teachers": row, "blend": row, "student": row,
        "teachers_on_all_targets": {TARGET: row}, "grouping": "tracklet"}))
    (run / "results.md").write_text("# synth_msmt -> synth_duke\n\n| model | synth_duke mAP |\n|---|---|\n"
                                    "| KD-ReID student (osnet_tiny) | 20.0 |\n\nNo number from `target` labels.\n")
    (run / "config.yaml").write_text(yaml.safe_dump({"sources": ["synth_msmt"], "targets": [TARGET],
                                                     "teacher_arch": "resnet_tiny", "student_arch": "osnet_tiny",
                                                     "root": str(tiny_domain)}))
    shutil.copy(tiny_model, run / "student.pt")
    shutil.copy(tiny_model, run / "stages" / f"teacher_{TARGET}" / "model.pt")
    stale = run / "report" / "stale.png"
    stale.parent.mkdir()
    stale.write_bytes(b"an older report's picture")
    assert build_report(run, visrank=2, topk=3, device="cpu") == run / "report.html"
    return run


def _images(page: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page.read_text())


def test_pipeline_report_has_every_picture_and_renders_in_chromium(pipeline_run, tmp_path):
    # One test (not two sharing a fixture) so that `pytest -n 2` never draws the pipeline's pictures twice.
    page = pipeline_run / "report.html"
    images = _images(page)
    # bars (mAP, rank-1), ranked results, activation maps (teacher and student), curves of 5 stages, histograms of the
    # teacher and the blend, the student's distances against its teachers'
    assert len(images) == 2 + 1 + 1 + 5 + 2 + 1
    assert all(src.startswith("report/") and (pipeline_run / src).is_file() for src in images)
    assert sorted(str(p.relative_to(pipeline_run)) for p in (pipeline_run / "report").rglob("*.png")) == \
        sorted(images)  # rebuilt whole: the older report's picture is gone
    text = page.read_text()
    assert "report/visrank/synth_duke_01.png" in images and "report/dmmd_stages_blend.png" in images
    assert "report/kd_stages_distill.png" in images and "report/actmap/synth_duke_01.png" in images
    assert "r: the correlation of each map with the teacher of synth_duke&#x27;s" in text
    ran = ["source_resnet_tiny", "source_osnet_tiny", "teacher_synth_duke", "blend", "distill"]  # the teachers' first
    positions = [text.index(f"Stage {name}") for name in ran]
    assert positions == sorted(positions)
    assert "<td>KD-ReID student (osnet_tiny)</td>" in text and "<code>target</code>" in text

    chromium = _chromium()
    if chromium is None:
        pytest.skip("CHROMIUM NOT FOUND: the report's content was checked but its browser test did not run; "
                    "install Debian's `chromium` (apt-get install -y chromium) or set KDREID_CHROMIUM=/path/to/chrome")
    result = _render(chromium, page, tmp_path / "profile")
    assert result == {"total": 12, "broken": [], "title": "kdreid run pipe: synth_msmt -> synth_duke"}
    # The check can fail: a picture gone from report/ is reported as broken.
    (pipeline_run / "report" / "pipeline_mAP.png").unlink()
    result = _render(chromium, page, tmp_path / "profile")
    assert result["broken"] == ["report/pipeline_mAP.png"]


def test_stage_folders_an_earlier_command_left_are_named_not_shown(pipeline_run):
    """Found by a review: after `--no-blend-baseline` in a run folder that had a blend, its old stage was shown as if
    it were part of the results."""
    config = yaml.safe_load((pipeline_run / "config.yaml").read_text())
    (pipeline_run / "config.yaml").write_text(yaml.safe_dump({**config, "blend_baseline": False}))
    text = build_report(pipeline_run, visrank=0, actmap=0).read_text()
    assert "Stage blend" not in text and "Stage distill" in text and "Stage teacher_synth_duke" in text
    assert "not shown: stages/blend, left by an earlier command in this run folder" in text


def test_single_stage_report_shows_what_it_has(tmp_path, tiny_model, rng, capsys):
    run = tmp_path / "adapt"
    _stage(run, "teacher D-MMD", histograms=True, rng=rng)
    shutil.copy(tiny_model, run / "model.pt")
    assert main(["report", str(run), "--visrank", "2"]) == 0
    page = run / "report.html"
    assert capsys.readouterr().out.strip() == str(page)
    assert _images(page) == ["report/curves_run.png", "report/dmmd_run.png"]
    # Its config's data root does not exist: the ranked results become a note, the rest is written.
    assert "synth_duke: no ranked results (" in page.read_text()
    # A distance file cut short costs its picture, not the page.
    (run / "distances_after.npz").write_bytes((run / "distances_after.npz").read_bytes()[:100])
    assert main(["report", str(run), "--visrank", "0"]) == 0
    assert _images(page) == ["report/curves_run.png"]
    assert "Results: no dmmd picture (" in page.read_text() and "not an .npz archive" in page.read_text()


def test_ranked_pictures_rank_as_the_run_evaluated(tmp_path, tiny_domain, tiny_model, rng, monkeypatch):
    """A run evaluated with cosine distances of flip-averaged features: its pictures must rank the same way."""
    import kdreid.viz

    run = tmp_path / "adapt"
    _stage(run, "teacher D-MMD", histograms=False, rng=rng)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config.update(data={"root": str(tiny_domain)}, eval={"metric": "cosine", "flip": True})
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.copy(tiny_model, run / "model.pt")
    drawn = []
    monkeypatch.setattr(kdreid.viz, "visualize_ranked_results", lambda query, gallery, out, **kw: drawn.append(
        (query.features, kw["metric"])) or [])
    build_report(run, visrank=2, topk=3, device="cpu")
    from kdreid.data.datasets import build_dataset
    from kdreid.evaluation.features import extract_features, load_model

    flipped = extract_features(load_model(tiny_model), build_dataset(TARGET, tiny_domain).query, flip=True)
    assert len(drawn) == 1 and drawn[0][1] == "cosine" and np.allclose(drawn[0][0], flipped.features, atol=1e-5)


def test_a_distillation_run_shows_where_its_teacher_and_student_look(tmp_path, tiny_domain, tiny_model, rng, capsys):
    run = tmp_path / "distill"
    _stage(run, "distill", histograms=False, rng=rng)
    teacher = tmp_path / "elsewhere" / "teacher.pt"
    teacher.parent.mkdir()
    shutil.copy(tiny_model, teacher)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config.update(data={"root": str(tiny_domain)}, teachers=[str(teacher)])
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.copy(tiny_model, run / "model.pt")
    assert main(["report", str(run), "--visrank", "0", "--actmap", "3"]) == 0
    assert "report/actmap/synth_duke_01.png" in _images(run / "report.html")
    assert "correlation of each map with the teacher of synth_duke" in (run / "report.html").read_text()
    # The teacher moved since the run: the student is drawn alone, without a comparison.
    teacher.unlink()
    assert main(["report", str(run), "--visrank", "0", "--actmap", "3"]) == 0
    assert "report/actmap/synth_duke_01.png" in _images(run / "report.html")
    assert "correlation" not in (run / "report.html").read_text()
    assert main(["report", str(run), "--actmap", "0", "--visrank", "0"]) == 0
    assert "actmap" not in (run / "report.html").read_text()
    assert main(["report", str(run), "--actmap", "-2"]) == 2
    assert "--actmap -2: the number of images must be 0 or more" in capsys.readouterr().err


def test_a_failed_report_leaves_the_previous_one_whole(tmp_path, tiny_model, rng, monkeypatch, capsys):
    import kdreid.report as report

    run = tmp_path / "adapt"
    _stage(run, "teacher D-MMD", histograms=True, rng=rng)
    assert main(["report", str(run), "--visrank", "0"]) == 0
    before = _images(run / "report.html")

    def broken(*args, **kwargs):
        raise report.KdreidError("a stage's metrics.json is not valid JSON")

    monkeypatch.setattr(report, "stage_section", broken)
    assert main(["report", str(run), "--visrank", "0"]) == 2
    assert before and all((run / picture).is_file() for picture in before)  # the old page still shows them
    assert not (run / ".report.new").exists()
    # A build killed while drawing left a partial folder beside the page's pictures; one killed in the swap, the
    # page's pictures set aside: the next build, failing too, leaves the page with all its pictures.
    (run / ".report.new").mkdir()
    (run / ".report.new" / "half.png").write_bytes(b"")
    assert main(["report", str(run), "--visrank", "0"]) == 2
    assert all((run / picture).is_file() for picture in before) and not (run / ".report.new").exists()
    (run / "report").rename(run / ".report.old")
    assert main(["report", str(run), "--visrank", "0"]) == 2
    assert all((run / picture).is_file() for picture in before) and not (run / ".report.old").exists()
    # The page itself cannot be written (a full disk): the old page gets its pictures back.
    monkeypatch.undo()

    def full_disk(path, text):
        raise report.KdreidError(f"cannot write {path}: no space left on the device")

    monkeypatch.setattr(report, "atomic_write_text", full_disk)
    files = {picture: (run / picture).stat().st_ino for picture in before}  # the very files, not same-named ones
    assert main(["report", str(run), "--visrank", "0"]) == 2
    assert {picture: (run / picture).stat().st_ino for picture in before} == files
    assert not (run / ".report.old").exists() and not (run / ".report.new").exists()
    # While a page is built, the one on disk keeps every picture it shows, until the swap at the end.
    monkeypatch.undo()
    seen_during_build = []
    real_stage_section = report.stage_section

    def watching(*args, **kwargs):
        seen_during_build.append(all((run / picture).is_file() for picture in before))
        return real_stage_section(*args, **kwargs)

    monkeypatch.setattr(report, "stage_section", watching)
    assert main(["report", str(run), "--visrank", "0"]) == 0
    assert seen_during_build == [True] and all((run / picture).is_file() for picture in _images(run / "report.html"))
    assert main(["report", str(run), "--visrank", "-1"]) == 2
    assert "--visrank must be 0 or more" in capsys.readouterr().err


def test_a_second_report_of_a_run_being_reported_is_refused_in_one_line(tmp_path, rng, capsys):
    # Two `kdreid report RUN` at once shared RUN/.report.new/: the second removed the first's pictures as it began,
    # and both then swapped folders, leaving a page whose pictures were missing (with exit code 0 for both).
    from kdreid.rundir import REPORT_LOCK_FILE
    from tests.test_rundir import hold_in_another_process

    run = tmp_path / "adapt"
    _stage(run, "teacher D-MMD", histograms=True, rng=rng)
    trainer = hold_in_another_process(run)  # a command writing the run (a pipeline between stages): reported
    try:
        assert main(["report", str(run), "--visrank", "0"]) == 0
    finally:
        trainer.kill()
        trainer.wait()
    page = (run / "report.html").read_text()
    before = {picture: (run / picture).read_bytes() for picture in _images(run / "report.html")}
    capsys.readouterr()
    holder = hold_in_another_process(run, REPORT_LOCK_FILE)  # another `kdreid report` of the run
    try:
        assert main(["report", str(run), "--visrank", "0"]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kdreid: error: {run} is in use by another kdreid process (pid {holder.pid} on ")
    assert err.endswith("wait for it to end, then report the run again") and "\n" not in err
    assert (run / "report.html").read_text() == page and not (run / ".report.new").exists()
    assert {picture: (run / picture).read_bytes() for picture in before} == before
    assert main(["report", str(run), "--visrank", "0"]) == 0  # free again


def test_evaluation_folder_report_includes_its_visrank_actmap_and_verification_pictures(tiny_domain, tiny_model, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tiny_model), "-t", TARGET, "--root", str(tiny_domain), "--device",
                 "cpu", "--out", str(out), "--visrank", "2", "--visrank-topk", "3", "--verification",
                 "--visactmap", "2"]) == 0
    page = build_report(out)
    assert _images(page) == ["visrank/synth_duke_01.png", "actmap/synth_duke_01.png", "verification/synth_duke.png"]
    text = page.read_text()
    assert "<td>synth_duke</td>" in text and "<th>TPR % at FPR 0.001</th>" in text and "ROC AUC" in text


def test_evaluation_report_shows_only_the_latest_visrank_pages_and_counts_them(tiny_domain, tiny_model, tmp_path,
                                                                             capsys):
    out = tmp_path / "eval"
    common = ["evaluate", "--model", str(tiny_model), "-t", TARGET, "--root", str(tiny_domain), "--device", "cpu",
              "--out", str(out), "--visrank-topk", "2"]
    assert main([*common, "--visrank", "9"]) == 0  # two pages
    assert main([*common, "--visrank", "2"]) == 0  # one page: the first run's second page must go
    capsys.readouterr()
    assert main(["report", str(out), "--visrank", "0"]) == 0
    err = capsys.readouterr().err.strip()
    assert _images(out / "report.html") == ["visrank/synth_duke_01.png"]
    assert err.endswith("(1 picture)"), err


def test_drawing_flags_on_an_evaluation_folder_are_named_as_without_effect(tiny_domain, tiny_model, tmp_path,
                                                                           capsys):
    """Found by a pictures review: `kdreid report EVAL --visrank 16` drew nothing and said nothing (an evaluation
    folder's page shows the pictures `kdreid evaluate` drew); the flags given are now named in a warning."""
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tiny_model), "-t", TARGET, "--root", str(tiny_domain), "--device",
                 "cpu", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["report", str(out), "--visrank", "16", "--visrank-topk", "5"]) == 0
    err = capsys.readouterr().err
    assert "warning: --visrank, --visrank-topk have no effect on an evaluation folder" in err
    assert main(["report", str(out), "--actmap", "2", "--root", str(tiny_domain), "--device", "cpu"]) == 0
    assert "warning: --actmap, --root, --device have no effect on an evaluation folder" in capsys.readouterr().err
    assert main(["report", str(out)]) == 0  # nothing asked: nothing to warn of
    assert "warning" not in capsys.readouterr().err


def test_the_drawing_flags_reach_the_page_and_default_as_their_help_says(tmp_path, rng, monkeypatch, capsys):
    """`kdreid report RUN`'s --visrank, --visrank-topk, --actmap, --root and --device, each passed on (none of
    them named as without effect on a stage's folder); left out: 4 queries, top-8, 8 activation maps."""
    import kdreid.report as report

    calls = []

    def build_report(run, **options):
        calls.append(options)
        (Path(run) / "report.html").write_text("<p>page</p>")
        return Path(run) / "report.html"

    monkeypatch.setattr(report, "build_report", build_report)
    run = tmp_path / "adapt"
    _stage(run, "teacher D-MMD", histograms=False, rng=rng)
    assert main(["report", str(run)]) == 0
    assert calls[-1] == {"visrank": 4, "topk": 8, "actmap": 8, "root": None, "device": None}
    assert main(["report", str(run), "--visrank", "3", "--visrank-topk", "2", "--actmap", "1", "--root",
                 str(tmp_path), "--device", "cpu"]) == 0
    assert calls[-1] == {"visrank": 3, "topk": 2, "actmap": 1, "root": str(tmp_path), "device": "cpu"}
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text("x"), "is a file, not a run folder"),
    (lambda p: p.mkdir(), "is not a kdreid run folder"),
    (lambda p: (p.mkdir(), (p / "config.yaml").write_text("out: x\n")), "holds a run that has not finished"),
    (lambda p: (p.mkdir(), (p / "metrics.json").write_text("{trunc")), "is not valid JSON"),
    (lambda p: (p.mkdir(), (p / "metrics.json").write_text("[1]")), "holds list, not the object"),
])
def test_not_a_run_is_one_line(make, message, tmp_path, capsys):
    path = tmp_path / "x"
    make(path)
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(path) in err


def test_a_run_still_training_is_named_with_its_process_not_sent_to_resume(tmp_path, capsys):
    # "continue it with --resume" is the fix for a stopped run; for one another process still trains, that --resume
    # would be refused: the page is for after it ends.
    from tests.test_rundir import hold_in_another_process

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("out: x\n")
    shutil.copytree(run, tmp_path / "other")
    holder = hold_in_another_process(run)
    try:
        for argv, then in ((["report", str(run)], "report it"), (["aggregate", str(run), str(tmp_path / "other")], "aggregate")):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert err == (f"kdreid: error: {run} holds a run that has not finished (no metrics.json yet): another "
                           f"kdreid process is training it ({(run / '.kdreid.lock').read_text().strip()}); wait for "
                           f"it to end, then {then}")
    finally:
        holder.kill()
        holder.wait()
    assert main(["report", str(run)]) == 2
    assert "continue it with the same command and --resume, then report it" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ damaged files
def _report(run: Path, capsys, *flags: str) -> str:
    """`kdreid report RUN` that must write the page (exit 0, one line on stderr, no warning); -> the page's HTML."""
    assert main(["report", str(run), *flags]) == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("wrote "), err
    return html.unescape((run / "report.html").read_text())


def _edit_json(path: Path, change) -> None:
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


def _edit_yaml(path: Path, settings: dict) -> None:
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **settings}))


@pytest.mark.parametrize("damage, found", [
    (b"\xff\xfe\n", "it is not YAML text"),
    (b"targets: [unclosed\n", "it is not YAML text"),
    (b"- 1\n", "it holds list, not the mapping a kdreid run writes"),
    ({"data": [1]}, "data is list, not a mapping"),
    ({"eval": [1]}, "eval is list, not a mapping"),
    ({"data": {"root": "nowhere", "cuhk03_split_id": "abc"}}, "data.cuhk03_split_id is str, not a whole number"),
    ({"targets": 5}, "targets is int, not a list of strings"),
    ({"targets": TARGET}, "targets is str, not a list of strings"),  # one name, not one note per letter
    ({"teachers": "teacher.pt"}, "teachers is str, not a list of strings"),
], ids=["not-utf8", "not-yaml", "not-a-mapping", "data-list", "eval-list", "split-id-text", "targets-int",
        "targets-one-name", "teachers-one-path"])
def test_a_damaged_config_costs_the_model_pictures_not_the_page(damage, found, tmp_path, tiny_model, rng, capsys):
    run = tmp_path / "adapt"
    _stage(run, "teacher D-MMD", histograms=False, rng=rng)
    shutil.copy(tiny_model, run / "model.pt")
    if isinstance(damage, bytes):
        (run / "config.yaml").write_bytes(damage)
    else:
        _edit_yaml(run / "config.yaml", damage)
    text = _report(run, capsys, "--visrank", "1", "--actmap", "1")
    assert f"no ranked results or activation maps: {run / 'config.yaml'} is damaged: {found}; restore the " \
           "config.yaml the run wrote" in text
    assert _images(run / "report.html") == ["report/curves_run.png"]  # the rest of the page is written


@pytest.mark.parametrize("damage, found", [
    (lambda run: (run / "results.md").write_bytes(b"\xff\xfe"),
     "Results: no results table ({run}/results.md is damaged: it is not UTF-8 text; run that stage again)"),
    (lambda run: _edit_json(run / "metrics.json", lambda m: m.update(epochs=[1, 2])),
     "Results: no training curves ({run}/metrics.json is damaged: 'epochs' entry 1 is not a training stage's record "
     "(TypeError: "),
    (lambda run: _edit_json(run / "metrics.json", lambda m: m.update(epochs=[{"epoch": "one", "losses": {}}])),
     "'epochs' entry 1 is not a training stage's record (ValueError: "),
    (lambda run: _edit_json(run / "metrics.json", lambda m: m["epochs"][1].update(losses={"loss": "x"})),
     "'epochs' entry 2 is not a training stage's record (ValueError: could not convert string to float: 'x'); run "
     "that stage again)"),
    (lambda run: ((run / "results.md").unlink(),
                  _edit_json(run / "metrics.json", lambda m: m["final"][TARGET].update(mAP="high"))),
     "Results: no results table ({run}/metrics.json is damaged: final.synth_duke.mAP is str, not a number or null; "
     "run that stage again)"),
    (lambda run: _edit_json(run / "metrics.json", lambda m: m.update(epochs={"1": {"epoch": 1}})),
     "Results: no training curves ({run}/metrics.json is damaged: 'epochs' is dict, not the list of epoch records a "
     "training stage writes; run that stage again)"),
], ids=["results-not-utf8", "epochs-ints", "epoch-text", "loss-text", "final-map-text", "epochs-not-a-list"])
def test_a_damaged_stage_file_costs_its_table_or_curves_not_the_page(damage, found, tmp_path, rng, capsys):
    run = tmp_path / "adapt"
    _stage(run, "teacher D-MMD", histograms=True, rng=rng)
    damage(run)
    text = _report(run, capsys, "--visrank", "0", "--actmap", "0")
    assert found.format(run=run) in text
    assert "report/dmmd_run.png" in _images(run / "report.html")  # the rest of the page is written


@pytest.mark.parametrize("damage, found", [
    (lambda run: (run / "config.yaml").write_text(yaml.safe_dump({"targets": 5, "root": "nowhere"})),
     "no ranked results: {run}/config.yaml is damaged: targets is int, not a list of strings"),
    (lambda run: (run / "results.md").write_bytes(b"# title\xff\n"),
     "no results table ({run}/results.md is damaged: it is not UTF-8 text; run the pipeline's command again"),
    (lambda run: _edit_json(run / "metrics.json", lambda m: m["student"][TARGET].update(mAP="high")),
     "no mAP bar chart ({run}/metrics.json is damaged: its 'student' row holds a mAP that is not a number"),
    (lambda run: _edit_json(run / "metrics.json", lambda m: m["student"].update({TARGET: "high"})),
     "no mAP bar chart ({run}/metrics.json is damaged: its 'student' row holds str for synth_duke, not a mapping of "
     "metrics"),
    (lambda run: _edit_json(run / "metrics.json", lambda m: m.update(student=[20.0])),
     "no mAP bar chart ({run}/metrics.json is damaged: its 'student' row is list, not a mapping of targets"),
    (lambda run: (run / "stages" / "blend" / "metrics.json").write_text("{trunc"),
     "Stage blend: no training curves ({run}/stages/blend/metrics.json is not valid JSON"),
], ids=["config-targets-int", "results-not-utf8", "row-map-text", "row-target-text", "row-list",
        "stage-metrics-not-json"])
def test_a_damaged_pipeline_file_costs_its_part_not_the_page(damage, found, tmp_path, rng, capsys):
    """A pipeline without its student.pt (nothing is ranked): its bars, stages and their curves."""
    run = tmp_path / "pipe"
    for name in ("source_osnet_tiny", "blend"):
        _stage(run / "stages" / name, name, histograms=False, rng=rng)
    row = {TARGET: {"mAP": 20.0, "rank1": 30.0}}
    (run / "metrics.json").write_text(json.dumps({"source_only": row, "blend": row, "student": row}))
    (run / "results.md").write_text("# synth_msmt -> synth_duke\n")
    (run / "config.yaml").write_text(yaml.safe_dump({"targets": [TARGET], "root": "nowhere"}))
    damage(run)
    text = _report(run, capsys, "--visrank", "1", "--actmap", "0")
    assert found.format(run=run) in text
    assert "Stage source_osnet_tiny" in text and "report/curves_stages_source_osnet_tiny.png" in text


EVALUATION = {
    "final": {TARGET: {"mAP": 22.8, "rank1": 20.6, "rank5": 52.9, "rank10": 64.7, "mINP": 13.2}},
    "verification": {TARGET: {"positive_pairs": 492, "negative_pairs": 4783, "auc": 0.656, "at_fpr": [
        {"fpr": 0.001, "tpr": 0.2, "threshold": 0.0204}, {"fpr": 0.01, "tpr": 3.66, "threshold": 0.028}]}},
    "evaluated_with": {TARGET: {"model": "model.pt", "metric": "euclidean", "flip": False}},
}


# What each part of an evaluation's page shows when its part of metrics.json is whole.
EVALUATION_PARTS = {"final": "<td>synth_duke</td><td>22.8</td>", "verification": "<th>ROC AUC</th>",
                    "evaluated_with": "synth_duke evaluated with model model.pt, metric euclidean"}


@pytest.mark.parametrize("part, damage, found", [
    ("verification", lambda m: m["verification"][TARGET]["at_fpr"][0].update(fpr="x"),
     "no verification table ({path} is damaged: verification.synth_duke.at_fpr[0].fpr is str, not a number; run "
     "kdreid evaluate again)"),
    ("verification", lambda m: m["verification"][TARGET]["at_fpr"][1].update(tpr="x"),
     "verification.synth_duke.at_fpr[1].tpr is str, not a number or null"),
    ("verification", lambda m: m["verification"][TARGET].update(auc="x"),
     "verification.synth_duke.auc is str, not a number or null"),
    ("verification", lambda m: m["verification"][TARGET].update(at_fpr=[1, 2]),
     "verification.synth_duke.at_fpr is a list holding int, not a list of mappings"),
    ("evaluated_with", lambda m: m.update(evaluated_with=["x"]),
     "the settings it was evaluated with are unknown ({path} is damaged: evaluated_with is list, not a mapping of "
     "mappings; run kdreid evaluate again)"),
    ("evaluated_with", lambda m: m.update(evaluated_with="oops"), "evaluated_with is str, not a mapping of mappings"),
    ("final", lambda m: m.update(final={"x": {"mAP": [1]}}),
     "no results table ({path} is damaged: final.x.mAP is list, not a number or null; run kdreid evaluate again)"),
], ids=["fpr-text", "tpr-text", "auc-text", "at-fpr-ints", "evaluated-with-list", "evaluated-with-text", "final-list"])
def test_a_damaged_evaluation_metrics_costs_its_table_or_line_not_the_page(part, damage, found, tmp_path, capsys):
    run = tmp_path / "eval"
    run.mkdir()
    metrics = json.loads(json.dumps(EVALUATION))
    damage(metrics)
    (run / "metrics.json").write_text(json.dumps(metrics))
    text = _report(run, capsys)
    assert found.format(path=run / "metrics.json") in text
    assert EVALUATION_PARTS[part] not in text
    assert all(shown in text for other, shown in EVALUATION_PARTS.items() if other != part)


def test_nan_distances_are_left_out_with_one_note(tmp_path, rng, capsys, recwarn):
    """A diverged model's distances (NaN) used to print numpy and matplotlib RuntimeWarnings and draw nothing."""
    run = tmp_path / "adapt"
    _stage(run, "teacher D-MMD", histograms=True, rng=rng)
    after = dict(np.load(run / "distances_after.npz"))
    after["target_within"] = np.full(40, np.nan)
    after["target_between"][:5] = np.inf
    np.savez_compressed(run / "distances_after.npz", **after)
    text = _report(run, capsys, "--visrank", "0", "--actmap", "0")
    assert text.count("are not finite") == 1
    assert "Results: 45 of the 160 distances in distances_after.npz are not finite (NaN or infinite: the model had " \
           "diverged); the picture leaves them out" in text
    assert "report/dmmd_run.png" in _images(run / "report.html")
    assert not [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("make, path", [
    (lambda run: (run / "report.html").mkdir(), "report.html"),
    (lambda run: (run / ".report.new").write_text("x"), ".report.new"),
    (lambda run: (run / ".report.old").write_text("x"), ".report.old"),
    (lambda run: (run / "report").write_text("x"), "report"),
], ids=["page-a-folder", "building-a-file", "replaced-a-file", "pictures-a-file"])
def test_what_stands_where_the_report_goes_is_named_to_move(make, path, tmp_path, rng, capsys):
    """The report's own paths: the user chose none of them, so the fix is to move what is there, said before any
    picture is drawn."""
    run = tmp_path / "adapt"
    _stage(run, "teacher D-MMD", histograms=False, rng=rng)
    make(run)
    assert main(["report", str(run), "--visrank", "0", "--actmap", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"kdreid: error: cannot write {run / path}: ")
    assert err.endswith("; move or remove it"), err
    assert (run / path).exists() and not (run / "report" / "curves_run.png").exists()


def test_markdown_tables_and_paragraphs():
    html = markdown_to_html("# T\n\n| a | b |\n|---|---|\n| 1 | <x> |\n\nsome `code` here\nand more\n")
    assert html == ("<h3>T</h3>\n<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td>"
                    "<td>&lt;x&gt;</td></tr></tbody></table>\n<p>some <code>code</code> here and more</p>")


# ------------------------------------------------------------------------------------------------ Chromium
def _chromium() -> str | None:
    for name in (os.environ.get("KDREID_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"));
  const out = document.createElement("pre");
  out.id = "kdreid-image-check";
  out.textContent = JSON.stringify({total: images.length, broken: broken, title: document.title});
  document.body.appendChild(out);
});
</script>"""


def _render(chromium: str, page: Path, profile: Path) -> dict:
    """Open a copy of `page` (beside it, so relative paths hold) with a load-time check appended, in headless
    Chromium; -> what the check wrote into the DOM."""
    probe = page.with_name("_probe.html")
    probe.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="kdreid-image-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"Chromium printed no check result (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def test_a_pipelines_ranked_pictures_rank_as_its_student_was_evaluated(pipeline_run, monkeypatch):
    # Found by a review: reading the distance from the pipeline's own config.yaml (which has no eval section)
    # instead of the distill stage's passed: the student's pictures ranked by another distance than its numbers.
    import kdreid.viz

    distill_config = pipeline_run / "stages" / "distill" / "config.yaml"
    config = yaml.safe_load(distill_config.read_text())
    config["eval"] = {"metric": "cosine", "flip": True}
    distill_config.write_text(yaml.safe_dump(config))
    drawn = []
    monkeypatch.setattr(kdreid.viz, "visualize_ranked_results", lambda query, gallery, out, **kw: drawn.append(
        kw["metric"]) or [])
    build_report(pipeline_run, visrank=2, topk=3, actmap=0, device="cpu")
    assert drawn == ["cosine"]


def test_the_pictures_read_the_cuhk03_protocol_and_the_distance_the_run_recorded(tmp_path):
    # Found by a review: cuhk03_labeled dropped from the pictures' dataset options passed (the labelled boxes'
    # pictures would have shown the detected ones).
    from kdreid.report import RunConfig, _data_options, _eval_options

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data": {"cuhk03_labeled": True, "cuhk03_classic_split": True,
                                             "cuhk03_split_id": 4}, "eval": {"metric": "cosine", "flip": True}}))
    config = RunConfig.read(path)
    assert _data_options(config) == {"cuhk03": {"labeled": True, "classic_split": True, "split_id": 4}}
    assert _eval_options(config) == {"metric": "cosine", "flip": True}


def test_a_distillations_activation_maps_put_each_target_under_its_own_teacher(tmp_path):
    # Found by a review: every target drawn under the first teacher passed. A teacher file that is gone leaves
    # that target with the student alone.
    from kdreid.report import RunConfig, _stage_models

    run = tmp_path / "distill"
    run.mkdir()
    teachers = [tmp_path / "teacher_a.pt", tmp_path / "gone.pt", tmp_path / "teacher_c.pt"]
    teachers[0].write_bytes(b"")
    teachers[2].write_bytes(b"")
    (run / "config.yaml").write_text(yaml.safe_dump({"targets": ["a", "b", "c"], "teacher_arch": "resnet18",
                                                     "teachers": [str(path) for path in teachers]}))
    models = _stage_models(run, RunConfig.read(run / "config.yaml"))
    student = ("student (model.pt)", run / "model.pt", None)
    assert models == {"a": [("teacher of a", teachers[0], "resnet18"), student],
                      "b": [("model.pt", run / "model.pt", None)],
                      "c": [("teacher of c", teachers[2], "resnet18"), student]}


def test_root_overrides_the_data_root_a_stage_run_recorded(tmp_path, tiny_domain, tiny_model, rng, capsys):
    # Found by a review: a stage run's pictures ignoring --root passed (the data moved since the run: no pictures).
    run = tmp_path / "adapt"
    _stage(run, "teacher D-MMD", histograms=False, rng=rng)  # its config.yaml records data.root "nowhere"
    shutil.copy(tiny_model, run / "model.pt")
    _report(run, capsys, "--visrank", "1", "--actmap", "1", "--root", str(tiny_domain))
    assert _images(run / "report.html") == ["report/curves_run.png", "report/visrank/synth_duke_01.png",
                                            "report/actmap/synth_duke_01.png"]
