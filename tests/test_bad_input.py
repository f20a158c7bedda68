"""Bad inputs of docs/bad-input.md: each is tried on the CLI in-process and must answer with exit code 2 and one
line naming the path or value and the fix; malicious pickles are refused without running their payload; a full
disk leaves no half-written file; an internal error keeps its traceback.

`python -m tests.test_bad_input` prints the table of docs/bad-input.md from the real answers."""

from __future__ import annotations

import errno
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from kdreid.cli import main
from kdreid.models import build_model, save_checkpoint
from tests.data.layouts import duke_tree, market_tree, write_csv, write_images

TINY = ["--epochs", "1", "--batch-size", "4", "--num-instances", "2", "--height", "32", "--width", "16",
        "--device", "cpu", "--seed", "0"]
TRAIN_IMAGE = "bounding_box_train/0002_c1s1_000451_03.jpg"


class Payload:
    """Unpickling this calls os.system, which would create `marker`: the test that it never runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@dataclass
class Case:
    what: str  # the bad input, as the docs table names it
    setup: Callable  # (tmp: Path, monkeypatch) -> argv
    answer: str  # a fragment of the one-line answer
    code: int = 2
    made_run_folder: bool = False  # found after TMP/run was made: the answer must also remove it


def _market(tmp: Path) -> tuple[Path, Path]:
    """A data root with market1501 (returned) and dukemtmcreid, the target of the training cases."""
    root = tmp / "data"
    duke_tree(root)
    return root, market_tree(root)


def _train(tmp: Path, root: Path, *extra: str) -> list[str]:
    return ["train-source", "-s", "market1501", "-a", "osnet_tiny", "--root", str(root), "--out",
            str(tmp / "run"), *TINY, *extra]


def _replace_image(content: bytes) -> Callable:
    def setup(tmp, monkeypatch):
        root, folder = _market(tmp)
        (folder / TRAIN_IMAGE).write_bytes(content if content != b"cut" else (folder / TRAIN_IMAGE).read_bytes()[:40])
        return _train(tmp, root)

    return setup


def _missing_root(tmp, monkeypatch):
    return ["data", "check", "--root", str(tmp / "nowhere"), "-d", "market1501"]


def _empty_folder(tmp, monkeypatch):
    (tmp / "data" / "market1501").mkdir(parents=True)
    return ["train-source", "-s", "market1501", "-a", "osnet_tiny", "--root", str(tmp / "data"), "--out",
            str(tmp / "run"), *TINY]


def _empty_train_split(tmp, monkeypatch):
    root, folder = _market(tmp)
    for path in (folder / "bounding_box_train").iterdir():
        path.unlink()
    return _train(tmp, root)


def _missing_split(tmp, monkeypatch):
    root, folder = _market(tmp)
    shutil.rmtree(folder / "query")
    return _train(tmp, root)


def _wrong_layout(tmp, monkeypatch):
    duke_tree(tmp / "data")
    (tmp / "data" / "dukemtmc-reid").rename(tmp / "data" / "market1501")
    return ["data", "check", "--root", str(tmp / "data"), "-d", "market1501"]


def _unreadable_image(tmp, monkeypatch):
    root, folder = _market(tmp)
    target = folder / TRAIN_IMAGE
    target.chmod(0)
    if os.geteuid() == 0:  # root reads any file: make the refusal the kernel would give happen at open()
        import PIL.Image

        real_open = PIL.Image.open

        def refusing_open(path, *args, **kwargs):
            if str(path) == str(target):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(PIL.Image, "open", refusing_open)
    return _train(tmp, root)


def _unreadable_folder(tmp, monkeypatch):
    root, folder = _market(tmp)
    target = folder / "bounding_box_train"
    target.chmod(0)
    if os.geteuid() == 0:
        real_scandir = os.scandir

        def refusing_scandir(path="."):
            if str(path) == str(target):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", refusing_scandir)
    return _train(tmp, root)


def _unknown_dataset(tmp, monkeypatch):
    root, _ = _market(tmp)
    return ["train-source", "-s", "market1502", "-a", "osnet_tiny", "--root", str(root), "--out", str(tmp / "run"),
            *TINY]


def _unknown_model(tmp, monkeypatch):
    root, _ = _market(tmp)
    return _train(tmp, root)[:4] + ["resnet51"] + _train(tmp, root)[5:]


def _checkpoint(tmp: Path, name: str, arch: str = "osnet_tiny", classes: int = 3) -> str:
    torch.manual_seed(0)
    return str(save_checkpoint(tmp / name, build_model(arch, classes), extra={"input_size": [32, 16]}))


def _tracklets_across_cameras(tmp: Path, command: str) -> list[str]:
    """A custom target whose tracklet column holds person ids: tracklets 7 and 8, each seen by cameras 1 and 2."""
    root, _ = _market(tmp)
    names = [f"t{i}.jpg" for i in range(8)]
    write_images(root / "site" / "train", names)
    write_csv(root / "site" / "manifest.csv", ["path", "pid", "camid", "tracklet"],
              [[f"train/{name}", 7 + i // 4, 1 + i % 2, 7 + i // 4] for i, name in enumerate(names)])
    if command == "pipeline":  # refused before its first stage, which would train for hours first
        return ["pipeline", "-s", "market1501", "-t", "custom:site", "--root", str(root), "--out", str(tmp / "run"),
                "--preset", "quick"]
    model = _checkpoint(tmp, "m.pt")
    flags = ["--init", model] if command == "adapt" else ["--teachers", model]
    return [command, "-s", "market1501", "-t", "custom:site", *flags, "--root", str(root), "--out",
            str(tmp / "run"), *TINY]


def _manifest_names_a_missing_image(tmp, monkeypatch):
    """One's own data whose manifest lists an image that is not there (deleted, or never copied)."""
    root, _ = _market(tmp)
    names = [f"p{i}.jpg" for i in range(8)]
    write_images(root / "shop" / "train", names)
    write_csv(root / "shop" / "manifest.csv", ["path", "pid", "camid"],
              [[f"train/{name}", 1 + i // 4, 1 + i % 2] for i, name in enumerate([*names, "gone.jpg"])])
    return ["train-source", "-s", "custom:shop", "-a", "osnet_tiny", "--root", str(root), "--out", str(tmp / "run"),
            *TINY]


def _teacher_count(tmp, monkeypatch):
    root, _ = _market(tmp)
    teacher = _checkpoint(tmp, "t.pt")
    return ["distill", "-s", "market1501", "-t", "dukemtmcreid", "--teachers", teacher, teacher, "--root", str(root),
            "--out", str(tmp / "run"), *TINY]


def _teacher_architecture(tmp, monkeypatch):
    root, _ = _market(tmp)
    plain = tmp / "osnet_weights.pth"
    torch.save(build_model("osnet_tiny", 3).state_dict(), plain)
    return ["distill", "-s", "market1501", "-t", "dukemtmcreid", "--teachers", str(plain), "--teacher-arch",
            "resnet_tiny", "--root", str(root), "--out", str(tmp / "run"), *TINY]


def _init_architecture(tmp, monkeypatch):
    root, _ = _market(tmp)
    return ["adapt", "-s", "market1501", "-t", "dukemtmcreid", "-a", "resnet_tiny", "--init",
            _checkpoint(tmp, "src.pt"), "--root", str(root), "--out", str(tmp / "run"), *TINY]


def _config_size(text: str) -> Callable:
    def setup(tmp, monkeypatch):
        root, _ = _market(tmp)
        (tmp / "config.yaml").write_text(text)
        return ["train-source", "-s", "market1501", "-a", "osnet_tiny", "--root", str(root), "--out",
                str(tmp / "run"), "--config", str(tmp / "config.yaml"), "--device", "cpu"]

    return setup


def _too_big_batch(tmp, monkeypatch):
    root, _ = _market(tmp)
    return _train(tmp, root, "--batch-size", "64")


def _images_too_small(tmp, monkeypatch):
    root, _ = _market(tmp)
    return _train(tmp, root, "--height", "16", "--width", "8")


def _export_to_a_folder(tmp, monkeypatch):
    (tmp / "exports").mkdir()
    return ["export", "--model", _checkpoint(tmp, "m.pt"), "--format", "onnx", "--out", str(tmp / "exports")]


def _export_into_a_file(tmp, monkeypatch):
    (tmp / "exports").write_text("")
    return ["export", "--model", _checkpoint(tmp, "m.pt"), "--format", "onnx", "--out", str(tmp / "exports" / "m.onnx")]


def _export_to_a_full_disk(tmp, monkeypatch):
    """TorchScript's C++ writer aborted the process on a full disk (rc 134); the bytes are written by kdreid now."""
    from kdreid import rundir

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    checkpoint = _checkpoint(tmp, "m.pt")
    monkeypatch.setattr(rundir.os, "fsync", fsync)
    return ["export", "--model", checkpoint, "--format", "torchscript", "--out", str(tmp / "m.ts")]


def _evaluate_on_a_missing_gpu(tmp, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also where the tests run on a GPU machine
    return _evaluate(tmp, _checkpoint(tmp, "m.pt"), "--device", "cuda")


def _evaluate_into_a_training_run(tmp, monkeypatch):
    (tmp / "run").mkdir()
    model = _checkpoint(tmp / "run", "model.pt")
    return _evaluate(tmp, model, "--out", str(tmp / "run"))


def _evaluate_into_a_foreign_metrics_file(content: bytes) -> Callable:
    def setup(tmp, monkeypatch):
        (tmp / "eval").mkdir()
        (tmp / "eval" / "metrics.json").write_bytes(content)
        monkeypatch.setattr("kdreid.evaluation.features.extract_features", _no_work)
        return _evaluate(tmp, _checkpoint(tmp, "m.pt"), "--out", str(tmp / "eval"))
    return setup


def _no_work(*args, **kwargs):
    raise AssertionError("the evaluation ran before the --out folder was checked")


def _out_is_a_file(tmp, monkeypatch):
    root, _ = _market(tmp)
    (tmp / "run").write_text("not a folder")
    return _train(tmp, root)


def _out_not_writable(tmp, monkeypatch):
    """--out an existing folder the user may not write in (made by another user, or read-only): no lock file can be
    created there and none exists."""
    from kdreid import rundir

    root, _ = _market(tmp)
    (tmp / "run").mkdir()
    (tmp / "run").chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the refusal the kernel would give happen at open()
        real_open = os.open

        def refusing_open(path, flags, *args, **kwargs):
            if Path(path).parent == tmp / "run" and flags & os.O_CREAT:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(rundir.os, "open", refusing_open)
    return _train(tmp, root)


def _folder_in_use(tmp, monkeypatch):
    """The run folder's lock is taken as another kdreid writing there takes it (flock on its own open file: the
    command below is refused as if another process held it)."""
    import fcntl

    from kdreid import rundir

    (tmp / "run").mkdir()
    lock = open(tmp / "run" / rundir.LOCK_FILE, "w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.write("pid 4242 on node7, started 2026-11-27 05:00:00: kdreid train-source ...\n")
    lock.flush()
    # Kept open by the monkeypatch: when it is undone after the case, the file is closed and the lock freed.
    monkeypatch.setattr(rundir, "_held_by_a_test", lock, raising=False)
    return _train(tmp, _market(tmp)[0])


def _non_finite_loss(value: float) -> Callable:
    def setup(tmp, monkeypatch):
        from kdreid.stages import source

        monkeypatch.setattr(source, "batch_hard_triplet", lambda embedding, *args: embedding.sum() * 0 + value)
        root, _ = _market(tmp)
        return _train(tmp, root)

    return setup


def _disk_full(tmp, monkeypatch):
    """fsync of the second last.pt (epoch 2) fails with ENOSPC, as a full disk often reports it."""
    from kdreid import rundir

    real_fsync = rundir.os.fsync
    writes = []

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if ".last.pt." in name:
            writes.append(name)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(rundir.os, "fsync", fsync)
    root, _ = _market(tmp)
    return _train(tmp, root)[:-len(TINY)] + [*TINY[2:], "--epochs", "2"]


def _finished_run(tmp) -> Path:
    root, _ = _market(tmp)
    assert main(_train(tmp, root)) == 0
    return root


def _resume_with_other_settings(tmp, monkeypatch):
    return _train(tmp, _finished_run(tmp), "--resume", "--lr", "0.01")


def _finished_run_without_checkpoints(tmp, monkeypatch):
    root = _finished_run(tmp)
    shutil.rmtree(tmp / "run" / "checkpoints")
    return _train(tmp, root)


def _evaluate(tmp: Path, model, *extra: str) -> list[str]:
    root, _ = _market(tmp)
    return ["evaluate", "--model", str(model), "-t", "market1501", "--root", str(root), *extra]


def _weights_of_another_osnet(tmp, monkeypatch):
    plain = tmp / "osnet_tiny_weights.pth"
    torch.save(build_model("osnet_tiny", 3).state_dict(), plain)
    return _evaluate(tmp, plain, "-a", "osnet_x0_25")


def _onnx_as_init(tmp, monkeypatch):
    exported = tmp / "m.onnx"
    assert main(["export", "--model", _checkpoint(tmp, "m.pt"), "--format", "onnx", "--out", str(exported)]) == 0
    root, _ = _market(tmp)
    return ["adapt", "-s", "market1501", "-t", "dukemtmcreid", "--init", str(exported), "--root", str(root), "--out",
            str(tmp / "run")]


def _text_as_model(tmp, monkeypatch):
    (tmp / "junk.pt").write_text("not weights")
    return _evaluate(tmp, tmp / "junk.pt")


def _training_state_as_init(tmp, monkeypatch):
    root = _finished_run(tmp)
    return ["adapt", "-s", "market1501", "-t", "dukemtmcreid", "--init", str(tmp / "run" / "checkpoints" / "last.pt"),
            "--root", str(root), "--out", str(tmp / "teacher"), *TINY]


def _bad_yaml(tmp, monkeypatch):
    (tmp / "config.yaml").write_text("train: {epochs: 3\n")
    root, _ = _market(tmp)
    return _train(tmp, root, "--config", str(tmp / "config.yaml"))


def _root_is_a_file(tmp, monkeypatch):
    (tmp / "data.tar").write_text("an archive, not extracted")
    return _train(tmp, tmp / "data.tar")


def _features_as_model(tmp, monkeypatch):
    np.savez(tmp / "g.npz", format=np.array("kdreid-features"), features=np.zeros((1, 4), np.float32))
    return _evaluate(tmp, tmp / "g.npz")


def _onnx_cut_short(tmp, monkeypatch):
    assert main(["export", "--model", _checkpoint(tmp, "m.pt"), "--format", "onnx", "--out", str(tmp / "m.onnx")]) == 0
    (tmp / "m.onnx").write_bytes((tmp / "m.onnx").read_bytes()[:2000])
    return ["extract", "--model", str(tmp / "m.onnx"), "--images", str(tmp), "--out", str(tmp / "g.npz")]


CASES = [
    Case("--root that does not exist", _missing_root, "does not exist; pass the parent folder of the datasets"),
    Case("empty dataset folder", _empty_folder, "expected bounding_box_train under"),
    Case("empty train split (no images)", _empty_train_split, "has no training images"),
    Case("a split folder missing", _missing_split, "query/ is missing; re-extract"),
    Case("wrong layout (Duke files under market1501/)", _wrong_layout,
         "it holds the DukeMTMC-reID layout, which -d dukemtmcreid reads under"),
    Case("truncated JPEG", _replace_image(b"cut"), "cannot be decoded (Truncated File Read)"),
    Case("zero-byte JPEG", _replace_image(b""), "cannot be decoded (cannot identify image file"),
    Case("non-image file named .jpg", _replace_image(b"<html>not an image</html>"), "cannot identify image file"),
    Case("unreadable image (permissions)", _unreadable_image, "is not readable (permission denied)"),
    Case("unreadable split folder (permissions)", _unreadable_folder, "permission denied; make it readable"),
    Case("a manifest row naming an image that does not exist", _manifest_names_a_missing_image,
         "shop/train/gone.jpg (custom:shop, train) does not exist; restore it or take it out of the dataset's list",
         made_run_folder=True),
    Case("unknown dataset name", _unknown_dataset, "unknown dataset 'market1502'; known:"),
    Case("unknown model name", _unknown_model, "unknown model 'resnet51'; known models:"),
    Case("wrong teacher count", _teacher_count, "2 teacher(s) for 1 target(s)"),
    Case("teacher of the wrong architecture", _teacher_architecture, "fit resnet_tiny's backbone"),
    Case("--init of another architecture than -a", _init_architecture, "holds a osnet_tiny model, not the resnet_tiny"),
    Case("image size in a config: not an integer", _config_size("train: {height: 64x32}\n"),
         "train.height: expected an integer, got '64x32'"),
    Case("image size in a config: zero", _config_size("train: {height: 0, width: 16}\n"),
         "--height must be at least 1"),
    Case("config file that is not valid YAML", _bad_yaml, "is not valid YAML"),
    Case("augmentation probability above 1 in a config", _config_size("train: {augment: {flip: 2.0}}\n"),
         "train.augment.flip is a probability, from 0 to 1; got 2.0"),
    Case("P×K batch larger than the data allow", _too_big_batch, "lower --batch-size or raise --num-instances"),
    Case("--out is a file", _out_is_a_file, "is a file, not a folder; choose another --out"),
    Case("--out a folder that is not writable", _out_not_writable,
         "run: permission denied; nothing was half-written (the previous file, if any, is intact): fix the "
         "permissions"),
    Case("a run folder another kdreid process is writing", _folder_in_use,
         "is in use by another kdreid process (pid 4242 on node7, "),
    Case("--device that is not a device", lambda tmp, monkeypatch: _train(tmp, _market(tmp)[0], "--device", "gpu"),
         "--device 'gpu' is not a device; use auto, cpu, cuda or cuda:N"),
    Case("`evaluate --device cuda` without a GPU", _evaluate_on_a_missing_gpu,
         "--device cuda asked for CUDA, but no GPU is visible; use --device cpu"),
    Case("images too small for the model", _images_too_small,
         "osnet_tiny cannot take 16x8 images (Given input size: (64x2x1). Calculated output size: (64x1x0). "
         "Output size is too small); choose a larger --height/--width"),
    Case("`export --out` an existing folder", _export_to_a_folder,
         "it is a folder, not a file; give a file path such as"),
    Case("`export --out` inside a file", _export_into_a_file,
         "exports is a file where a folder is needed; move that file or choose another path"),
    Case("`export` to a full disk (simulated)", _export_to_a_full_disk,
         "m.ts: no space left on the device; nothing was half-written"),
    Case("`evaluate --out` a training run's folder", _evaluate_into_a_training_run,
         "is a training run's folder (it holds model.pt), whose metrics.json is the run's own"),
    Case("plain state dict with the wrong -a (only part of the backbone fits)", _weights_of_another_osnet,
         "backbone tensors are missing or of another shape"),
    Case("an exported ONNX file as --init", _onnx_as_init, "an exported ONNX model; this command takes"),
    Case("a text file as --model", _text_as_model, "not a PyTorch file"),
    Case("a run's checkpoints/last.pt as --init", _training_state_as_init,
         "a run's training checkpoint, not a model; pass RUN/model.pt"),
    Case("--topk below 1", lambda tmp, monkeypatch: ["search", "--gallery", str(tmp / "g.npz"), "--query",
                                                      str(tmp), "--topk", "-1"], "--topk must be at least 1, got -1"),
    Case("--resume with other settings than the run's", _resume_with_other_settings,
         "was trained with other settings than this command's (train.optim.lr 0.00035 -> 0.01)"),
    Case("a finished run folder whose checkpoints were deleted", _finished_run_without_checkpoints,
         "already holds a finished model"),
    Case("NaN loss", _non_finite_loss(float("nan")), "non-finite loss at epoch 1, iteration 1: loss=nan, triplet=nan"),
    Case("inf loss", _non_finite_loss(float("inf")), "non-finite loss at epoch 1, iteration 1: loss=inf, triplet=inf"),
    Case("out of disk space while writing a checkpoint (simulated)", _disk_full,
         "no space left on the device; nothing was half-written"),
    Case("`evaluate --out` a folder whose metrics.json is another program's", _evaluate_into_a_foreign_metrics_file(
        b"[1, 2]"), "is not an evaluation's metrics.json (expected {\"final\": {target: metrics}}); remove it"),
    Case("`evaluate --out` a folder whose metrics.json is damaged", _evaluate_into_a_foreign_metrics_file(
        b"\xff\xfe{"), "cannot be read as JSON (UnicodeDecodeError); remove it or choose another --out"),
    Case("an ONNX opset the exporter does not write", lambda tmp, monkeypatch: [
        "export", "--model", _checkpoint(tmp, "m.pt"), "--format", "onnx", "--out", str(tmp / "m.onnx"), "--opset",
        "99"], "--opset 99: torch's ONNX exporter writes opsets 7 to 20 (default 18)"),
    Case("a negative --seed", lambda tmp, monkeypatch: _train(tmp, _market(tmp)[0], "--seed", "-1"),
         "--seed must be between 0 and 2**32 - 1, got -1"),
    Case("--device of a kind kdreid does not run on", lambda tmp, monkeypatch: _train(tmp, _market(tmp)[0],
                                                                                      "--device", "mps"),
         "--device mps: kdreid runs on the CPU or CUDA; use auto, cpu, cuda or cuda:N"),
    Case("a dataset named twice", lambda tmp, monkeypatch: ["train-source", "-s", "market1501", "market1501",
                                                            "--root", str(_market(tmp)[0]), "--out", str(tmp / "run"),
                                                            *TINY],
         "-s names market1501 twice; name each dataset once"),
    Case("a target named twice", lambda tmp, monkeypatch: ["train-source", "-s", "market1501", "-t", "dukemtmcreid",
                                                           "dukemtmcreid", "--root", str(_market(tmp)[0]), "--out",
                                                           str(tmp / "run"), *TINY],
         "-t names dukemtmcreid twice; name each dataset once"),
    Case("a target's tracklets that span cameras (adapt)", lambda tmp, monkeypatch: _tracklets_across_cameras(
        tmp, "adapt"), "target custom:site: 2 training tracklets span several cameras (e.g. tracklet 0); a tracklet "
                       "is one person in one camera", made_run_folder=True),
    Case("a target's tracklets that span cameras (distill)", lambda tmp, monkeypatch: _tracklets_across_cameras(
        tmp, "distill"), "split them per camera (distill samples its target batches by tracklet",
         made_run_folder=True),
    Case("a target's tracklets that span cameras (pipeline)", lambda tmp, monkeypatch: _tracklets_across_cameras(
        tmp, "pipeline"), "split them per camera (or set `adapt: {grouping: pseudo}` in the --config file"),
    Case("the source named as a target", lambda tmp, monkeypatch: [
        "adapt", "-s", "market1501", "-t", "market1501", "--init", _checkpoint(tmp, "s.pt"), "--root",
        str(_market(tmp)[0]), "--out", str(tmp / "run"), *TINY],
         "-s and -t both name market1501: a target is a dataset other than the source"),
    Case("a negative --dmmd-weight", lambda tmp, monkeypatch: ["adapt", "-s", "market1501", "-t", "dukemtmcreid",
                                                               "--init", str(tmp / "s.pt"), "--dmmd-weight", "-1"],
         "--dmmd-weight must be 0 (a control run) or positive, got -1.0"),
    Case("a distillation weight that is not a number", lambda tmp, monkeypatch: [
        "distill", "-s", "market1501", "-t", "dukemtmcreid", "--teachers", str(tmp / "t.pt"), "--lkdt-weight", "nan"],
         "--lkdt-weight must be 0 or positive, got nan"),
    Case("--pretrained beside --student-init", lambda tmp, monkeypatch: [
        "distill", "-s", "market1501", "-t", "dukemtmcreid", "--teachers", str(tmp / "t.pt"), "--student-init",
        str(tmp / "s.pt"), "--pretrained", str(tmp / "w.pth")],
         "has no effect with --student-init (the student starts from that checkpoint); leave one of them out"),
    Case("`report --root` that does not exist", lambda tmp, monkeypatch: ["report", str(tmp), "--root",
                                                                          str(tmp / "nowhere")],
         "is not a folder; pass the data root the run read"),
    # Found by a bad-input review (stop 23).
    Case("`extract --out` naming the --model file", lambda tmp, monkeypatch: [
        "extract", "--model", _checkpoint(tmp, "m.pt"), "--images", str(tmp), "--out", str(tmp / "m.pt")],
         "is the --model file: writing it would replace it; choose another --out"),
    Case("`export --out` ending in /", lambda tmp, monkeypatch: [
        "export", "--model", _checkpoint(tmp, "m.pt"), "--format", "onnx", "--out", f"{tmp / 'exports'}/"],
         "the trailing / names a folder, not a file; give a file path such as"),
    Case("--config that is a folder", lambda tmp, monkeypatch: _train(tmp, _market(tmp)[0], "--config", str(tmp)),
         "is a folder; pass a YAML file"),
    Case("--root that is a file", _root_is_a_file, "is a file, not a folder; pass the parent folder of the datasets"),
    Case("a features file as --model", _features_as_model, "is a features file (kdreid extract), not a model"),
    Case("--pretrained PATH that does not exist", lambda tmp, monkeypatch: _train(
        tmp, _market(tmp)[0], "--pretrained", str(tmp / "weights.pth")),
         "does not exist; --pretrained (or `pretrained:` in --config) takes imagenet, none or the path"),
    Case("an ONNX file cut short", _onnx_cut_short, "export it again"),
    Case("label smoothing of 1 or more in a config", _config_size("label_smoothing: 1.5\n"),
         "label_smoothing must be in [0, 1), got 1.5"),
    Case("a negative weight decay in a config", _config_size("train: {optim: {weight_decay: -1}}\n"),
         "train.optim.weight_decay must be 0 or more, got -1"),
    Case("a file that is not an image as `extract --images`", lambda tmp, monkeypatch: [
        "extract", "--model", _checkpoint(tmp, "m.pt"), "--images", _checkpoint(tmp, "x.pt"), "--out",
        str(tmp / "g.npz")], "is not an image file (.jpg"),
    Case("a run folder as `extract --model` (its model.pt meant)", lambda tmp, monkeypatch: [
        "extract", "--model", str(Path(_checkpoint(tmp / "run", "model.pt")).parent), "--images", str(tmp), "--out",
        str(tmp / "g.npz")], "run is a folder, not a file; its model is "),
    Case("a folder without a model as `extract --model`", lambda tmp, monkeypatch: [
        "extract", "--model", str(tmp), "--images", str(tmp), "--out", str(tmp / "g.npz")],
         "is a folder, not a file; pass a kdreid checkpoint"),
]



def _one_line_error(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("kdreid: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


@pytest.mark.parametrize("case", CASES, ids=[case.what for case in CASES])
def test_bad_input_answers_in_one_line(case, tmp_path, monkeypatch, capsys):
    argv = case.setup(tmp_path, monkeypatch)
    code = main(argv)
    line = _one_line_error(capsys.readouterr().err)
    assert code == case.code and case.answer in line, line
    if case.made_run_folder:
        assert not (tmp_path / "run").exists()


def test_a_model_that_cannot_take_the_images_is_refused_before_the_run_folder_stays(tmp_path, monkeypatch, capsys):
    assert main(_images_too_small(tmp_path, monkeypatch)) == 2
    assert "cannot take 16x8 images" in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()  # no config.yaml, log.txt or tensorboard folder of a run that never began


def test_out_of_disk_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch, capsys):
    from kdreid.stages.loop import load_training_state

    assert main(_disk_full(tmp_path, monkeypatch)) == 2
    assert "cannot write" in _one_line_error(capsys.readouterr().err)
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "previous.pt"]  # no .tmp left behind
    assert load_training_state(folder / "last.pt")["epoch"] == 1  # the complete epoch-1 checkpoint, intact


def test_an_internal_error_keeps_its_traceback(tmp_path, monkeypatch):
    from kdreid.stages import source

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(source, "build_model", broken)
    root, _ = _market(tmp_path)
    with pytest.raises(RuntimeError, match="a bug"):
        main(_train(tmp_path, root))


# ------------------------------------------------------------------------------------------------ malicious files
def _evil(tmp: Path, kind: str) -> tuple[Path, Path]:
    """A file whose loading with pickle would run `touch marker`. -> (file, marker)."""
    marker = tmp / "PAYLOAD_RAN"
    if kind == "npz":
        path = tmp / "evil.npz"
        np.savez(path, format=np.array("kdreid-features"), features=np.array([Payload(marker)], dtype=object),
                 paths=np.array(["a.jpg"]), pids=np.array([1]), camids=np.array([1]), model=np.array("m"),
                 flip=np.array(False))
    elif kind == "zip":  # what torch.save writes
        path = tmp / "evil.pt"
        torch.save({"state_dict": {"conv1.weight": Payload(marker)}}, path)
    else:  # a bare pickle (the legacy torch format)
        path = tmp / "evil.pth"
        path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
    return path, marker


def _entry_points(tmp: Path, root: Path, evil: Path, good: str) -> dict[str, list[str]]:
    out = str(tmp / "run")
    kd = ["distill", "-s", "market1501", "-t", "dukemtmcreid", "--root", str(root), "--out", out, *TINY]
    return {
        "evaluate --model": ["evaluate", "--model", str(evil), "-t", "market1501", "--root", str(root)],
        "export --model": ["export", "--model", str(evil), "--format", "onnx", "--out", str(tmp / "m.onnx")],
        "extract --model": ["extract", "--model", str(evil), "--images", str(root), "--out", str(tmp / "g.npz")],
        "train-source --pretrained": _train(tmp, root, "--pretrained", str(evil)),
        "adapt --init": ["adapt", "-s", "market1501", "-t", "dukemtmcreid", "--init", str(evil), "--root", str(root),
                         "--out", out, *TINY],
        "distill --teachers": [*kd, "--teachers", str(evil), "--student-init", good],
        "distill --student-init": [*kd, "--teachers", good, "--student-init", str(evil)],
        "distill --teachers --teacher-arch": [*kd, "--teachers", str(evil), "--teacher-arch", "osnet_tiny"],
        "train-source --resume (checkpoints/last.pt)": _train(tmp, root, "--resume"),
    }


ENTRY_POINTS = list(_entry_points(Path("t"), Path("r"), Path("e"), "g"))


@pytest.mark.parametrize("kind", ["zip", "pickle"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_malicious_pickle_is_refused_without_running(entry, kind, tmp_path, capsys):
    root, _ = _market(tmp_path)
    evil, marker = _evil(tmp_path, kind)
    if entry.startswith("train-source --resume"):
        (tmp_path / "run" / "checkpoints").mkdir(parents=True)
        shutil.copy(evil, tmp_path / "run" / "checkpoints" / "last.pt")
    argv = _entry_points(tmp_path, root, evil, _checkpoint(tmp_path, "good.pt"))[entry]
    code = main(argv)
    line = _one_line_error(capsys.readouterr().err)
    expected = ("refused, loading it would run code (it needs posix.system)" if kind == "zip" else
                "refused, it is a pickle of arbitrary objects, not weights, and loading it could run code")
    assert code == 2 and expected in line, line
    assert not marker.exists()


def test_a_features_file_with_pickled_objects_is_refused_without_running(tmp_path, capsys):
    evil, marker = _evil(tmp_path, "npz")
    code = main(["search", "--gallery", str(evil), "--query", str(evil)])
    line = _one_line_error(capsys.readouterr().err)
    assert code == 2 and "Object arrays cannot be loaded when allow_pickle=False" in line, line
    assert not marker.exists()


def test_the_payload_would_run_if_unpickled(tmp_path):
    # The guard on the tests above: the same files do run their payload when loaded unsafely.
    evil, marker = _evil(tmp_path, "pickle")
    pickle.loads(evil.read_bytes())
    assert marker.exists()


# ------------------------------------------------------------------------------------------------ the docs table
def render_table() -> str:
    """The Markdown rows of docs/bad-input.md, from the CLI's real answers (temporary paths shortened)."""
    import contextlib
    import io
    import tempfile

    rows = ["| bad input | exit | what kdreid answers (one line on stderr) |", "|---|---|---|"]
    entries = [(case.what, case.setup) for case in CASES]
    for name in ENTRY_POINTS:
        for kind in ("zip", "pickle")[:1]:
            def setup(tmp, monkeypatch, name=name, kind=kind):
                root, _ = _market(tmp)
                evil, _ = _evil(tmp, kind)
                if name.startswith("train-source --resume"):
                    (tmp / "run" / "checkpoints").mkdir(parents=True)
                    shutil.copy(evil, tmp / "run" / "checkpoints" / "last.pt")
                return _entry_points(tmp, root, evil, _checkpoint(tmp, "good.pt"))[name]
            entries.append((f"malicious pickle to `{name}`", setup))
    entries.append(("malicious .npz (object arrays) to `search --gallery`",
                    lambda tmp, monkeypatch: ["search", "--gallery", str(_evil(tmp, "npz")[0]), "--query", "q.jpg"]))
    for what, setup in entries:
        with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as monkeypatch:
            tmp = Path(folder)
            argv = setup(tmp, monkeypatch)
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(argv)
            line = next(line for line in err.getvalue().splitlines() if line.startswith("kdreid: error:"))
            line = line.replace(str(tmp.resolve()), "TMP").replace(str(tmp), "TMP").replace("|", "\\|")
            rows.append(f"| {what} | {code} | `` {line} `` |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render_table(), end="")
