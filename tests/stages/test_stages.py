"""Tiny end-to-end runs of the source and D-MMD stages on CPU (seconds each)."""

import json
import logging
import shutil

import pytest
import torch
import yaml

from kdreid.cli import main
from kdreid.data.datasets import build_dataset
from kdreid.errors import CheckpointError, ConfigError, DatasetError
from kdreid.evaluation.features import evaluate_model
from kdreid.losses import dmmd_terms
from kdreid.models import load_checkpoint
from kdreid.stages import adapt
from kdreid.stages.data import dataset_fingerprint
from kdreid.stages.presets import resolve_config

TINY = ["--epochs", "2", "--batch-size", "16", "--num-instances", "4", "--height", "64", "--width", "32",
        "--device", "cpu", "--seed", "0"]


@pytest.fixture(scope="module")
def source_run(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "source"
    assert main(["train-source", "-s", "synth_msmt", "-t", "synth_duke", "-a", "osnet_tiny",
                 "--root", str(synth_root), "--out", str(out), *TINY]) == 0
    return out


def test_source_run_writes_its_folder(source_run, synth_root):
    recorded = json.loads((source_run / "datasets.json").read_text())  # what `kdreid pipeline` compares
    assert recorded == {name: dataset_fingerprint(build_dataset(name, synth_root), synth_root)
                        for name in ("synth_msmt", "synth_duke")}
    metrics = json.loads((source_run / "metrics.json").read_text())
    assert set(metrics["final"]) == {"synth_msmt", "synth_duke"}
    assert set(metrics["final"]["synth_duke"]) == {"mAP", "rank1", "rank5", "rank10", "rank20", "mINP"}
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2] and metrics["selection"] == "last epoch"
    results = (source_run / "results.md").read_text()
    assert ("Measured with euclidean distances between embeddings; the market protocol for synth_msmt, synth_duke "
            "(a query's gallery images of its identity in its camera left out") in results
    assert set(metrics["epochs"][0]["losses"]) == {"loss", "ce", "triplet"}
    for name in ("config.yaml", "log.txt", "results.md", "checkpoints/last.pt"):
        assert (source_run / name).is_file()
    assert "source only (osnet_tiny) | synth_duke" in (source_run / "results.md").read_text()
    model = load_checkpoint(source_run / "model.pt")
    assert model.arch == "osnet_tiny" and model.kdreid_meta["extra"]["input_size"] == [64, 32]
    # What distill's teacher-order check and `kdreid evaluate`'s CUHK03-split check read: the training datasets.
    assert model.kdreid_meta["datasets"] == ["synth_msmt"] and model.kdreid_meta["metrics"] == metrics["final"]
    assert model(torch.rand(2, 3, 64, 32)).shape == (2, model.embedding_dim)


def test_rerun_without_resume_is_refused_with_a_hint_and_touches_nothing(source_run, synth_root, capsys):
    config_before = (source_run / "config.yaml").read_text()
    code = main(["train-source", "-s", "synth_msmt", "-a", "osnet_tiny", "--root", str(synth_root),
                 "--out", str(source_run), *TINY[:-2], "--seed", "5"])
    assert code == 2 and "pass --resume" in capsys.readouterr().err
    assert (source_run / "config.yaml").read_text() == config_before


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--num-instances", "1"], "--num-instances must be at least 2"),
    (["--batch-size", "10"], "not a multiple of --num-instances 4"),
    (["--lr", "-1"], "--lr must be positive"),
])
def test_unusable_settings_are_one_line_errors(flags, message, synth_root, tmp_path, capsys):
    code = main(["train-source", "-s", "synth_msmt", "-a", "osnet_tiny", "--root", str(synth_root),
                 "--out", str(tmp_path / "r"), *TINY, *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def _config_file(path, key: str, value, context: dict | None = None):
    """A --config file setting the dotted `key` (written nested, as a user writes it), and the `context` settings
    that make the run use it (the optimiser or schedule it belongs to)."""
    data: dict = {}
    for dotted, setting in {**(context or {}), key: value}.items():
        *parents, leaf = dotted.split(".")
        node = data
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = list(setting) if isinstance(setting, tuple) else setting
    path.write_text(yaml.safe_dump(data))
    return str(path)


SGD, STEP, COSINE = ({"train.optim.optimizer": "sgd"}, {"train.optim.scheduler": "step"},
                     {"train.optim.scheduler": "cosine"})
SOURCE_VAL = {"train.select": "source-val"}


# Settings no run can use: before, some stopped in torch with a traceback (exit 1) and left a half-written run
# folder, one (eval.batch_size) only after a whole epoch, and the others trained on nonsense (a negative learning
# rate after a milestone, ...). Each is now one line, exit 2, before the run folder is made.
NO_RUN_CAN_USE = [
    ("label_smoothing", 1.5, "label_smoothing must be in [0, 1), got 1.5"),
    ("label_smoothing", 1.0, "label_smoothing must be in [0, 1), got 1.0"),
    ("label_smoothing", -0.1, "label_smoothing must be in [0, 1), got -0.1"),
    ("triplet_margin", float("inf"), "triplet_margin must be a finite number, got inf"),
    ("last_stride", 3, "last_stride must be 1 or 2, got 3"),
    ("train.optim.lr", float("inf"), "--lr must be positive, got inf"),
    ("train.optim.weight_decay", -1, "train.optim.weight_decay must be 0 or more, got -1.0"),
    ("train.optim.weight_decay", float("nan"), "train.optim.weight_decay must be 0 or more, got nan"),
    ("train.optim.momentum", 1.0, "train.optim.momentum must be in [0, 1), got 1.0", SGD),
    ("train.optim.momentum", -0.5, "train.optim.momentum must be in [0, 1), got -0.5", SGD),
    ("train.optim.betas", (1.5, 0.999), "train.optim.betas must be two numbers, each in [0, 1), got [1.5, 0.999]"),
    ("train.optim.betas", (0.9, -0.1), "train.optim.betas must be two numbers, each in [0, 1), got [0.9, -0.1]"),
    ("train.optim.milestones", [-1, 20], "train.optim.milestones must be 0-based epochs (0 or more), got [-1, 20]"),
    ("train.optim.step_size", 0, "train.optim.step_size must be at least 1 (epochs), got 0", STEP),
    ("train.optim.gamma", -1, "train.optim.gamma must be positive (the factor of each decay), got -1.0"),
    ("train.optim.gamma", 0, "train.optim.gamma must be positive (the factor of each decay), got 0.0"),
    ("train.optim.min_lr_factor", 1.5, "train.optim.min_lr_factor must be in [0, 1] (the cosine floor, a fraction "
                                       "of --lr), got 1.5", COSINE),
    ("train.optim.min_lr_factor", -0.1, "train.optim.min_lr_factor must be in [0, 1]", COSINE),
    ("train.optim.warmup_epochs", -5, "train.optim.warmup_epochs must be 0 (no warm-up) or more, got -5"),
    ("train.optim.warmup_factor", 0, "train.optim.warmup_factor must be in (0, 1] (the first epoch's fraction of "
                                     "--lr), got 0.0"),
    ("train.optim.warmup_factor", 2, "train.optim.warmup_factor must be in (0, 1]"),
    ("train.optim.clip_grad_norm", -1, "train.optim.clip_grad_norm must be 0 (no clipping) or positive, got -1.0"),
    ("train.source_val_ids", 0, "train.source_val_ids must be a fraction strictly between 0 and 1, got 0.0",
     SOURCE_VAL),
    ("train.source_val_ids", 1, "train.source_val_ids must be a fraction strictly between 0 and 1, got 1.0",
     SOURCE_VAL),
    ("train.augment.pad", -1, "train.augment.pad must be 0 or more; got -1"),
    ("train.augment.erase_attempts", -1, "train.augment.erase_attempts must be 0 or more; got -1"),
    ("train.augment.erase_aspect", float("inf"), "train.augment.erase_aspect must be positive; got inf"),
    ("eval.batch_size", 0, "eval.batch_size must be at least 1 (images), got 0"),
]
NO_RUN_CAN_USE = [case if len(case) == 4 else (*case, None) for case in NO_RUN_CAN_USE]  # (..., context)


@pytest.mark.parametrize("key, value, message, context", NO_RUN_CAN_USE,
                         ids=[f"{k}={v}" for k, v, _, _ in NO_RUN_CAN_USE])
def test_a_setting_no_run_can_use_is_one_line_before_the_run_folder(key, value, message, context, synth_root,
                                                                    tmp_path, capsys):
    out = tmp_path / "runs" / "r"
    code = main(["train-source", "-s", "synth_msmt", "-a", "osnet_tiny", "--root", str(synth_root),
                 "--out", str(out), *TINY, "--config", _config_file(tmp_path / "c.yaml", key, value, context)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kdreid: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()  # nor the parent this call would have made


ADAPT = ["adapt", "-s", "synth_msmt", "-t", "synth_duke", "--init", "{tmp}/source.pt"]
DISTILL = ["distill", "-s", "synth_msmt", "-t", "synth_duke", "--teachers", "{tmp}/teacher.pt"]
STAGE_SETTINGS_NO_RUN_CAN_USE = [
    (ADAPT, "label_smoothing", 1.0, "label_smoothing must be in [0, 1), got 1.0"),
    (ADAPT, "triplet_margin", float("nan"), "triplet_margin must be a finite number, got nan"),
    (ADAPT, "pseudo.eps", 0, "pseudo.eps must be a positive distance, got 0.0"),
    (ADAPT, "pseudo.min_samples", 0, "pseudo.min_samples must be at least 1, got 0"),
    (ADAPT, "pseudo.k1", 0, "pseudo.k1 must be at least 1, got 0"),
    (ADAPT, "pseudo.k2", -1, "pseudo.k2 must be at least 1, got -1"),
    (ADAPT, "eval.batch_size", 0, "eval.batch_size must be at least 1 (images), got 0"),
    # found by a review: a term named twice was summed twice (twice --dmmd-weight)
    (ADAPT, "dmmd_terms", ["within", "within"],
     "--dmmd-terms within within: choose one or more of within, between, features, each once"),
    (ADAPT, "train.optim.gamma", -1, "train.optim.gamma must be positive"),
    (DISTILL, "label_smoothing", 1.5, "label_smoothing must be in [0, 1), got 1.5"),
    (DISTILL, "triplet_margin", float("-inf"), "triplet_margin must be a finite number, got -inf"),
    (DISTILL, "eval.batch_size", -1, "eval.batch_size must be at least 1 (images), got -1"),
    (DISTILL, "train.optim.momentum", 1.5, "train.optim.momentum must be in [0, 1), got 1.5", SGD),
]
STAGE_SETTINGS_NO_RUN_CAN_USE = [case if len(case) == 5 else (*case, None) for case in STAGE_SETTINGS_NO_RUN_CAN_USE]


@pytest.mark.parametrize("command, key, value, message, context", STAGE_SETTINGS_NO_RUN_CAN_USE,
                         ids=[f"{c[0]}-{k}={v}" for c, k, v, _, _ in STAGE_SETTINGS_NO_RUN_CAN_USE])
def test_adapt_and_distill_refuse_a_setting_no_run_can_use_before_the_run_folder(command, key, value, message,
                                                                                 context, synth_root, tmp_path,
                                                                                 capsys):
    # The --init/--teachers files need not exist: the settings are checked before anything is read.
    out = tmp_path / "runs" / "r"
    code = main([*(part.format(tmp=tmp_path) for part in command), "--root", str(synth_root), "--out", str(out),
                 *TINY, "--config", _config_file(tmp_path / "c.yaml", key, value, context)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kdreid: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("key, value", [
    ("train.optim.weight_decay", 0.0), ("label_smoothing", 0.0), ("triplet_margin", 0.0),
    ("triplet_margin", -1000.0),  # a CE-only run: the triplet hinge never opens
    ("train.optim.momentum", 0.0), ("train.optim.betas", (0.0, 0.0)), ("train.optim.milestones", []),
    ("train.optim.milestones", [0, 500]), ("train.optim.milestones", [20, 20]), ("train.optim.gamma", 2.0),
    ("train.optim.min_lr_factor", 1.0),
    # what this run does not use is left alone, as the run leaves it (the default: Adam, multistep, select last)
    ("train.optim.momentum", 1.5), ("train.optim.step_size", 0), ("train.optim.min_lr_factor", 5.0),
    ("train.source_val_ids", 0.0), ("train.log_freq", 0),
    ("train.optim.warmup_epochs", 0), ("train.optim.warmup_epochs", 1000), ("train.optim.warmup_factor", 1.0),
    ("train.optim.clip_grad_norm", 0.0), ("train.optim.step_size", 1000), ("train.augment.pad", 0),
    ("train.augment.erase_attempts", 0), ("eval.batch_size", 1), ("train.log_freq", 1),
])
def test_unusual_settings_a_run_can_use_are_accepted(key, value):
    from kdreid.stages.source import SourceConfig

    resolve_config(SourceConfig, "source", overrides={key: value}).validate()


@pytest.mark.parametrize("preset", [None, "paper", "quick"])
def test_the_defaults_and_presets_pass_validation(preset):
    from kdreid.stages import distill, source

    resolve_config(source.SourceConfig, "source", preset=preset).validate()
    resolve_config(adapt.AdaptConfig, "adapt", preset=preset, overrides={"init": "s.pt"}).validate()
    resolve_config(distill.DistillConfig, "distill", preset=preset, overrides={"teachers": ["t.pt"]}).validate()


def test_the_paper_preset_holds_the_original_scripts_settings():
    """DESIGN §5 and reference/original-system.md §3: P×K = 8×4 at 256×128; source and D-MMD with Adam 3e-4,
    betas (0.9, 0.99), weight decay 5e-4; D-MMD from 0-based epoch 25; KD with SGD 0.01, momentum 0.9 (torchreid's
    SGD: no Nesterov), 50 epochs, evaluated every 5 (found by a review: any of these could change unnoticed)."""
    from kdreid.stages import distill, source

    configs = {
        "source": resolve_config(source.SourceConfig, "source", preset="paper"),
        "adapt": resolve_config(adapt.AdaptConfig, "adapt", preset="paper"),
        "distill": resolve_config(distill.DistillConfig, "distill", preset="paper"),
    }
    for stage, config in configs.items():
        train = config.train
        assert (train.batch_size, train.num_instances, train.height, train.width) == (32, 4, 256, 128), stage
        assert train.optim.weight_decay == 5e-4, stage
    for stage in ("source", "adapt"):
        optim = configs[stage].train.optim
        assert (optim.optimizer, optim.lr, tuple(optim.betas)) == ("adam", 3e-4, (0.9, 0.99)), stage
    assert configs["adapt"].dmmd_start == 25
    assert configs["adapt"].train.optim.milestones == [50]  # the original's StepLR(50)
    # the preset's own choice, as its comment says: 60 source epochs, a warm-up and two decays
    source_train = configs["source"].train
    assert source_train.epochs == 60 and source_train.optim.warmup_epochs > 0
    assert len(source_train.optim.milestones) == 2
    kd = configs["distill"].train
    assert (kd.optim.optimizer, kd.optim.lr, kd.optim.momentum, kd.optim.nesterov) == ("sgd", 0.01, 0.9, False)
    assert (kd.epochs, kd.eval_freq, list(kd.optim.milestones)) == (50, 5, [20, 40])


def test_the_quick_preset_keeps_its_documented_choices():
    # docs/algorithms.md: D-MMD on normalised embeddings, and a student that matches the teachers' neck.
    from kdreid.stages import distill

    quick_adapt = resolve_config(adapt.AdaptConfig, "adapt", preset="quick")
    quick_distill = resolve_config(distill.DistillConfig, "distill", preset="quick")
    assert quick_adapt.dmmd_normalize and quick_adapt.dmmd_start == 1
    assert quick_distill.kd_feature == "neck"
    assert (quick_distill.train.height, quick_distill.train.width) == (64, 32)


def test_a_config_file_setting_one_key_keeps_the_presets_others(tmp_path):
    # Found by a review: a config file's `train:` section replacing the preset's whole section passed every test,
    # silently dropping the preset's epochs, sizes and optimiser.
    from kdreid.stages import source

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  optim:\n    lr: 0.001\n")
    config = resolve_config(source.SourceConfig, "source", preset="paper", config_file=str(path))
    assert config.train.optim.lr == 0.001
    assert config.train.epochs == 60 and config.train.height == 256 and tuple(config.train.optim.betas) == (0.9, 0.99)
    flag = resolve_config(source.SourceConfig, "source", preset="paper", config_file=str(path),
                          overrides={"train.optim.lr": 0.002})
    assert flag.train.optim.lr == 0.002 and flag.train.epochs == 60


def test_resume_of_a_finished_run_trains_no_more(source_run, synth_root):
    before = (source_run / "checkpoints" / "last.pt").stat().st_mtime_ns
    assert main(["train-source", "-s", "synth_msmt", "-t", "synth_duke", "-a", "osnet_tiny", "--root",
                 str(synth_root), "--out", str(source_run), "--resume", *TINY]) == 0
    assert (source_run / "checkpoints" / "last.pt").stat().st_mtime_ns == before
    assert "resumed from" in (log := (source_run / "log.txt").read_text()) and "all 2 epochs were trained" in log
    assert "continuing at epoch 3" not in log


def test_a_finished_run_resumed_with_other_evaluation_settings_measures_them(synth_root, tmp_path):
    # Resuming a finished run with another distance and one more target exited 0 and kept the old numbers (of the
    # Euclidean distance, without the new target) under a results table that named the new distance.
    out = tmp_path / "run"
    args = ["train-source", "-s", "synth_msmt", "-a", "osnet_tiny", "--root", str(synth_root), "--out", str(out),
            *TINY[:1], "1", *TINY[2:]]
    assert main(args) == 0
    checkpoint_time = (out / "checkpoints" / "last.pt").stat().st_mtime_ns
    cosine = tmp_path / "cosine.yaml"
    cosine.write_text("eval:\n  metric: cosine\n")
    assert main([*args, "-t", "synth_duke", "--config", str(cosine), "--resume"]) == 0
    final = json.loads((out / "metrics.json").read_text())["final"]
    model = load_checkpoint(out / "model.pt")
    for name in ("synth_msmt", "synth_duke"):
        expected = evaluate_model(model, build_dataset(name, synth_root), metric="cosine", height=64, width=32,
                                  device="cpu").summary()
        assert final[name]["mAP"] == pytest.approx(expected["mAP"], abs=1e-4)
    assert "cosine distances" in (out / "results.md").read_text()
    assert "evaluating epoch 1's weights again: eval.metric 'euclidean' -> 'cosine'" in (out / "log.txt").read_text()
    assert (out / "checkpoints" / "last.pt").stat().st_mtime_ns == checkpoint_time  # nothing trained again


def test_resume_with_other_training_settings_is_refused_and_touches_nothing(source_run, synth_root, capsys):
    config_before = (source_run / "config.yaml").read_text()
    flags = ["train-source", "-s", "synth_msmt", "-a", "osnet_tiny", "--root", str(synth_root), "--out",
             str(source_run), "--resume"]
    code = main([*flags, *TINY[:-2], "--seed", "7", "--lr", "0.05"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "train.seed 0 -> 7" in err and "train.optim.lr" in err and "resume it with its own settings" in err
    assert (source_run / "config.yaml").read_text() == config_before
    # What only changes how the run is executed or reported may differ: it resumes (and, finished, trains no more).
    before = (source_run / "checkpoints" / "last.pt").stat().st_mtime_ns
    assert main([*flags, *TINY[:-4], "--device", "auto", "--seed", "0", "--compile", "off", "--eval-freq", "1"]) == 0
    assert (source_run / "checkpoints" / "last.pt").stat().st_mtime_ns == before


def test_resume_after_the_datasets_moved_continues_and_records_their_new_place(source_run, synth_root, tmp_path):
    # `--root` says where the datasets lie, not which ones: moving them must not force training from scratch.
    moved = tmp_path / "moved"
    moved.symlink_to(synth_root, target_is_directory=True)
    before = (source_run / "checkpoints" / "last.pt").stat().st_mtime_ns
    assert main(["train-source", "-s", "synth_msmt", "-t", "synth_duke", "-a", "osnet_tiny", "--root", str(moved),
                 "--out", str(source_run), "--resume", *TINY]) == 0
    assert (source_run / "checkpoints" / "last.pt").stat().st_mtime_ns == before
    assert f"root: {moved}" in (source_run / "config.yaml").read_text()


def test_a_finished_run_without_its_checkpoints_is_not_overwritten(source_run, synth_root, tmp_path, capsys):
    import shutil

    copy = tmp_path / "finished"
    shutil.copytree(source_run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    model_before = (copy / "model.pt").read_bytes()
    for resume in ([], ["--resume"]):
        code = main(["train-source", "-s", "synth_msmt", "-a", "osnet_tiny", "--root", str(synth_root),
                     "--out", str(copy), *TINY, *resume])
        assert code == 2 and "already holds a finished model" in capsys.readouterr().err
    assert (copy / "model.pt").read_bytes() == model_before


def test_a_stage_that_fails_on_its_inputs_leaves_no_run_folder(source_run, synth_root, tmp_path, capsys):
    out = tmp_path / "teacher"
    code = main(["adapt", "-s", "synth_msmt", "-t", "synth_duke", "--init", str(tmp_path / "missing.pt"),
                 "--root", str(synth_root), "--out", str(out), *TINY])
    assert code == 2 and "missing.pt" in capsys.readouterr().err
    assert not out.exists()
    code = main(["train-source", "-s", "synth_nowhere", "-a", "osnet_tiny", "--root", str(synth_root),
                 "--out", str(out / "a" / "b"), *TINY])
    assert code == 2 and not out.exists()  # nor the parents it made for the folder
    # A folder that was there before is left as it was.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train-source", "-s", "synth_nowhere", "-a", "osnet_tiny", "--root", str(synth_root),
                 "--out", str(out), *TINY]) == 2
    assert (out / "notes.txt").read_text() == "mine"


def test_a_stage_that_fails_before_its_first_checkpoint_leaves_no_run_folder(synth_root, tmp_path, monkeypatch,
                                                                            capsys):
    # Training began (log, tensorboard) but nothing can be resumed: the folder goes as for a setup error.
    from kdreid.stages import source

    monkeypatch.setattr(source, "batch_hard_triplet", lambda embedding, *args: embedding.sum() * float("nan"))
    out = tmp_path / "run"
    assert main(["train-source", "-s", "synth_msmt", "-a", "osnet_tiny", "--root", str(synth_root),
                 "--out", str(out), *TINY]) == 2
    assert "non-finite loss at epoch 1, iteration 1" in capsys.readouterr().err
    assert not out.exists()


def test_a_stage_closes_its_log_as_it_returns_so_a_run_made_anew_there_logs_again(synth_root, tmp_path):
    # From one long-lived process (a notebook, a sweep): the first run's log.txt used to stay open after the call
    # returned, and a second run in a folder made anew at the same path logged to the deleted file, leaving none.
    from kdreid.stages import source

    out = tmp_path / "run"
    config = resolve_config(source.SourceConfig, "source", overrides={
        "sources": ["synth_msmt"], "arch": "osnet_tiny", "out": str(out), "data.root": str(synth_root),
        "train.device": "cpu", "train.epochs": 1, "train.height": 32, "train.width": 16, "train.batch_size": 16,
        "train.eval_freq": 0})
    source.run(config)
    held = [h for h in logging.getLogger(f"kdreid.{out.resolve()}").handlers if isinstance(h, logging.FileHandler)]
    assert not held  # no log.txt held open
    shutil.rmtree(out)
    source.run(config)
    assert "wrote" in (out / "log.txt").read_text()


def test_a_run_folder_another_process_writes_is_refused_and_left_alone(source_run, synth_root, tmp_path, capsys):
    from tests.test_rundir import hold_in_another_process

    # The same stage started twice (here: resumed while it still runs), and a second pipeline on the same folder.
    stage = tmp_path / "source"
    shutil.copytree(source_run, stage)
    pipeline = tmp_path / "pipeline"
    commands = {
        stage: ["train-source", "-s", "synth_msmt", "-a", "osnet_tiny", "--root", str(synth_root),
                "--out", str(stage), *TINY, "--resume"],
        pipeline: ["pipeline", "-s", "synth_msmt", "-t", "synth_duke", "--root", str(synth_root),
                   "--out", str(pipeline), "--teacher-arch", "osnet_tiny", "--student-arch", "osnet_tiny",
                   "--preset", "quick"],
    }
    for folder, command in commands.items():
        holder = hold_in_another_process(folder)
        before = {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*")}
        try:
            assert main(command) == 2
        finally:
            holder.kill()
            holder.wait()
        err = capsys.readouterr().err
        assert f"kdreid: error: {folder} is in use by another kdreid process (pid {holder.pid} " in err
        assert {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*")} == before


def test_adapt_with_tracklets_trains_dmmd_and_saves_histograms(source_run, synth_root, tmp_path):
    out = tmp_path / "teacher"
    # No -a: the architecture comes from the --init checkpoint.
    assert main(["adapt", "-s", "synth_msmt", "-t", "synth_duke",
                 "--init", str(source_run / "model.pt"), "--root", str(synth_root), "--out", str(out),
                 "--dmmd-start", "1", *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "mmd_within" not in metrics["epochs"][0]["losses"]  # before --dmmd-start
    losses = metrics["epochs"][1]["losses"]
    assert {"mmd_within", "mmd_between", "mmd_features"} <= set(losses)
    assert losses["loss"] == pytest.approx(sum(losses[k] for k in ("ce", "triplet", "mmd_within", "mmd_between",
                                                                    "mmd_features")), rel=1e-4)
    assert metrics["grouping"] == "tracklet"
    for name in ("distances_before.npz", "distances_after.npz"):
        import numpy as np

        arrays = np.load(out / name)
        assert set(arrays) == {"source_within", "source_between", "target_within", "target_between"}
        assert arrays["target_within"].mean() < arrays["target_between"].mean() * 1.5
    teacher = load_checkpoint(out / "model.pt")
    assert teacher.kdreid_meta["extra"]["grouping"] == "tracklet"


def test_the_run_log_says_what_a_weights_file_gave_the_model(synth_root, tmp_path):
    from kdreid.models import build_model

    foreign = build_model("osnet_tiny", 751)  # another toolkit's file: `module.` keys, its own classifier
    torch.save({"state_dict": {f"module.{k}": v for k, v in foreign.state_dict().items()}}, tmp_path / "w.pth")
    out = tmp_path / "from-file"
    assert main(["train-source", "-s", "synth_msmt", "-a", "osnet_tiny", "--root", str(synth_root), "--out", str(out),
                 "--pretrained", str(tmp_path / "w.pth"), *TINY[:1], "1", *TINY[2:]]) == 0
    log = (out / "log.txt").read_text()
    assert "osnet_tiny weights: loaded 300 tensors from" in log and "1 discarded: module.classifier.weight" in log


def test_a_weights_file_with_an_embedding_layer_starts_a_source_run(synth_root, tmp_path):
    """SpCL's layout (`feat` + `feat_bn`) as --pretrained: the source stage stopped with "build it with
    embedding_dim=24", which no train-source flag sets (a review); it is built with the file's layer, as distill's
    student is."""
    from kdreid.models import build_model, read_checkpoint

    spcl = build_model("osnet_tiny", 0, embedding_dim=24).state_dict()
    renamed = {"module." + k.replace("embed.", "feat.").replace("bnneck.", "feat_bn."): v for k, v in spcl.items()}
    torch.save({"state_dict": renamed}, tmp_path / "spcl.pth")
    out = tmp_path / "from-spcl"
    assert main(["train-source", "-s", "synth_msmt", "-a", "osnet_tiny", "--root", str(synth_root), "--out", str(out),
                 "--pretrained", str(tmp_path / "spcl.pth"), *TINY[:1], "1", *TINY[2:]]) == 0
    assert read_checkpoint(out / "model.pt")["build_args"]["embedding_dim"] == 24
    assert "1 missing: classifier.weight" in (out / "log.txt").read_text()


def test_a_target_with_training_images_only_is_adapted_to_and_not_evaluated(source_run, synth_root, tmp_path):
    # One's own cameras: tracker crops with track ids, no labelled query/gallery. The run stopped after training
    # ("empty query set") with no model.
    root = tmp_path / "data"
    root.mkdir()
    (root / "synth_msmt").symlink_to(synth_root / "synth_msmt")
    (root / "custom").mkdir()
    rows = ["path,pid,camid,tracklet,split"] + [f"{r.path},{r.tracklet},{r.camid},{r.tracklet},train"
                                                for r in build_dataset("synth_duke", synth_root).train]
    (root / "custom" / "manifest.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "own-cameras"
    assert main(["adapt", "-s", "synth_msmt", "-t", "custom", "--init", str(source_run / "model.pt"),
                 "--root", str(root), "--out", str(out), "--dmmd-start", "0", *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["final"]) == {"synth_msmt"} and metrics["epochs"][1]["losses"]["mmd_within"] > 0
    assert "custom has no query or no gallery images: it is not evaluated" in (out / "log.txt").read_text()


def test_before_dmmd_starts_the_target_forward_keeps_no_graph_but_moves_batchnorm(source_run, synth_root,
                                                                                   tmp_path, monkeypatch):
    calls = []  # grad mode of each training-mode forward, in order: source, target, source, target, ...
    batchnorm_means = []

    def load_and_spy(*args, **kwargs):
        model = load_checkpoint(*args, **kwargs)
        first_bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))

        def hook(module, inputs, output):
            if module.training:
                calls.append(torch.is_grad_enabled())
                batchnorm_means.append(first_bn.running_mean.clone())

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(adapt, "load_checkpoint", load_and_spy)
    out = tmp_path / "late-dmmd"
    assert main(["adapt", "-s", "synth_msmt", "-t", "synth_duke", "--init", str(source_run / "model.pt"),
                 "--root", str(synth_root), "--out", str(out), "--dmmd-start", "1", *TINY]) == 0
    steps = len(calls) // 4  # 2 epochs × 2 forwards a step
    assert len(calls) == 4 * steps and steps > 0
    first_epoch, second_epoch = calls[:2 * steps], calls[2 * steps:]
    assert first_epoch[0::2] == [True] * steps and first_epoch[1::2] == [False] * steps  # target: no graph
    assert all(second_epoch)  # D-MMD on: the target batch is in the loss
    # The graph-free target forward still updates the BatchNorm statistics (the original's mild AdaBN).
    assert not torch.equal(batchnorm_means[0], batchnorm_means[1])
    assert "D-MMD never runs" not in (out / "log.txt").read_text()


def test_a_dmmd_start_after_the_last_epoch_is_named(source_run, synth_root, tmp_path, capsys):
    out = tmp_path / "no-dmmd"
    assert main(["adapt", "-s", "synth_msmt", "-t", "synth_duke", "--init", str(source_run / "model.pt"),
                 "--root", str(synth_root), "--out", str(out), *TINY, "--epochs", "1", "--dmmd-start", "1"]) == 0
    assert ("--dmmd-start 1 >= --epochs 1: D-MMD never runs, so this run only fine-tunes on the source; lower "
            "--dmmd-start or raise --epochs") in (out / "log.txt").read_text()


def test_adapt_minimises_only_the_chosen_dmmd_terms(source_run, synth_root, tmp_path):
    out = tmp_path / "within-only"
    assert main(["adapt", "-s", "synth_msmt", "-t", "synth_duke", "--init", str(source_run / "model.pt"),
                 "--root", str(synth_root), "--out", str(out), "--dmmd-start", "0", "--dmmd-weight", "2",
                 "--dmmd-terms", "within", *TINY]) == 0
    losses = json.loads((out / "metrics.json").read_text())["epochs"][0]["losses"]
    assert "mmd_features" in losses  # logged, not minimised
    assert losses["loss"] == pytest.approx(losses["ce"] + losses["triplet"] + 2 * losses["mmd_within"], rel=1e-4)


def test_a_control_run_logs_the_dmmd_terms_without_building_their_graph(source_run, synth_root, tmp_path,
                                                                         monkeypatch):
    grad_enabled = []

    def spy(*args, **kwargs):
        grad_enabled.append(torch.is_grad_enabled())
        return dmmd_terms(*args, **kwargs)

    monkeypatch.setattr(adapt, "dmmd_terms", spy)
    out = tmp_path / "control"
    assert main(["adapt", "-s", "synth_msmt", "-t", "synth_duke", "--init", str(source_run / "model.pt"),
                 "--root", str(synth_root), "--out", str(out), "--dmmd-start", "0", "--dmmd-weight", "0",
                 *TINY]) == 0
    losses = json.loads((out / "metrics.json").read_text())["epochs"][0]["losses"]
    assert grad_enabled and not any(grad_enabled)
    assert losses["mmd_within"] > 0 and losses["loss"] == pytest.approx(losses["ce"] + losses["triplet"], rel=1e-4)


def test_a_compiled_adaptation_compiles_the_dmmd_terms(source_run, synth_root, tmp_path, monkeypatch):
    original, compiled_fns = torch.compile, []

    def eager_backend(fn, **kwargs):  # dynamo's real path without inductor's C++ build (minutes on 2 cores)
        compiled_fns.append(fn)
        return original(fn, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_backend)
    out = tmp_path / "compiled"
    assert main(["adapt", "-s", "synth_msmt", "-t", "synth_duke", "--init", str(source_run / "model.pt"),
                 "--root", str(synth_root), "--out", str(out), "--dmmd-start", "1", "--compile", "default",
                 *TINY]) == 0
    assert dmmd_terms in compiled_fns
    log = (out / "log.txt").read_text()
    assert "torch.compile (default)" in log and "failed" not in log
    assert json.loads((out / "metrics.json").read_text())["epochs"][1]["losses"]["mmd_within"] > 0


def test_adapt_can_split_source_pairs_by_tracklet_and_normalise(source_run, synth_root, tmp_path, monkeypatch):
    seen, images = [], []

    def spy(source_embeddings, source_groups, target_embeddings, target_groups, normalize, source_images,
            target_images):
        assert normalize is True
        seen.append(source_groups.clone())
        images.append((source_images.clone(), source_groups.clone(), target_images.clone(), target_groups.clone()))
        return dmmd_terms(source_embeddings, source_groups, target_embeddings, target_groups, normalize=normalize,
                          source_images=source_images, target_images=target_images)

    monkeypatch.setattr(adapt, "dmmd_terms", spy)
    out = tmp_path / "source-tracklets"
    assert main(["adapt", "-s", "synth_msmt", "-t", "synth_duke", "--init", str(source_run / "model.pt"),
                 "--root", str(synth_root), "--out", str(out), "--dmmd-start", "0",
                 "--dmmd-source-groups", "tracklet", "--dmmd-normalize", "--dmmd-copies", "exclude", *TINY]) == 0
    tracklets = {r.tracklet for r in build_dataset("synth_msmt", synth_root).train}
    assert seen and all(set(groups.tolist()) <= tracklets for groups in seen)
    # A source batch holds K images of each of P identities; split by tracklet, some identity spans cameras.
    assert any(len(set(groups.tolist())) > 16 // 4 for groups in seen)
    log = (out / "log.txt").read_text()
    assert "source pairs by tracklet, normalised embeddings, copies of one image left out" in log
    # D-MMD is told which image each row is (copies of one image are no pair): the records' own groups.
    target_tracklets = [r.tracklet for r in build_dataset("synth_duke", synth_root).train]
    source_train = build_dataset("synth_msmt", synth_root).train
    for source_images, source_groups, target_images, target_groups in images:
        assert [source_train[i].tracklet for i in source_images.tolist()] == source_groups.tolist()
        assert [target_tracklets[i] for i in target_images.tolist()] == target_groups.tolist()


def test_adapt_selects_by_the_label_free_target_score(source_run, synth_root, tmp_path):
    out = tmp_path / "selected"
    assert main(["adapt", "-s", "synth_msmt", "-t", "synth_duke", "--init", str(source_run / "model.pt"),
                 "--root", str(synth_root), "--out", str(out), "--select", "target-clusters", "--eval-freq", "1",
                 *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    scores = [e["metrics"]["target-clusters"]["score"] for e in metrics["epochs"]]
    best = 1 + max(range(len(scores)), key=lambda i: (scores[i], -i))  # the first of equal scores
    assert metrics["selection"].startswith("best label-free target score") and f"(epoch {best})" in metrics["selection"]
    assert metrics["final"] == metrics["epochs"][best - 1]["metrics"]
    assert "target-clusters" not in (out / "results.md").read_text()  # a score, not a retrieval row
    with pytest.raises(ConfigError, match="name them with -t"):
        main_config = resolve_config(adapt.AdaptConfig, "adapt")
        from kdreid.stages.common import stage_evaluator

        main_config.targets, main_config.train.select = [], "target-clusters"
        stage_evaluator(None, [], None, main_config, torch.device("cpu"), logging.getLogger("test"))


def test_adapt_bad_inputs(source_run, synth_root, tmp_path):
    def config(**changes):
        base = {"sources": ["synth_msmt"], "targets": ["synth_duke"], "arch": "osnet_tiny",
                "init": str(source_run / "model.pt"), "out": str(tmp_path / "x"), "data.root": str(synth_root),
                "train.device": "cpu", "train.height": 64, "train.width": 32, "train.batch_size": 16}
        return resolve_config(adapt.AdaptConfig, "adapt", overrides=base | changes)

    with pytest.raises(CheckpointError, match="holds a osnet_tiny model, not the resnet_tiny"):
        adapt.run(config(arch="resnet_tiny"))
    with pytest.raises(ConfigError, match="run it once per target, or pass --blend"):
        adapt.run(config(targets=["synth_duke", "synth_msmt"]))
    with pytest.raises(DatasetError, match="needs at least that many"):
        adapt.run(config(**{"train.batch_size": 4000}))
    with pytest.raises(ConfigError, match="needs a source model trained with --select source-val"):
        adapt.run(config(**{"train.select": "source-val"}))
    with pytest.raises(ConfigError, match="--dmmd-terms within var: choose one or more of within, between, features"):
        adapt.run(config(dmmd_terms=["within", "var"]))


def test_adapt_refuses_an_init_of_another_source_label_space_in_one_line(source_run, three_domains, tmp_path,
                                                                         capsys):
    # -s A B numbers A's identities first: an --init trained on -s B A (or on A with --combineall) has as many
    # classes, or another count, but other identities in its classifier rows. The same count was accepted silently
    # (CE against misaligned rows), and --combineall on one side was refused with "pass the checkpoint of a source
    # run on the same data" without naming --combineall.
    from kdreid.models import build_model, save_checkpoint
    from kdreid.stages.data import combine_train, load_datasets

    sources = ["synth_msmt", "synth_duke"]
    classes = 1 + max(r.pid for r in combine_train(load_datasets(sources, str(three_domains))))
    init = save_checkpoint(tmp_path / "two.pt", build_model("osnet_tiny", classes),
                           config={"sources": sources, "data": {"combineall": False}},
                           extra={"stage": "source", "input_size": [64, 32]})
    out = tmp_path / "teacher"
    base = ["adapt", "-t", "synth_cuhk", "--root", str(three_domains), "--out", str(out), *TINY]
    assert main([*base, "-s", "synth_duke", "synth_msmt", "--init", str(init)]) == 2
    err = capsys.readouterr().err
    assert err == (f"kdreid: error: --init {init} was trained with -s synth_msmt synth_duke, but this run has -s "
                   "synth_duke synth_msmt, another source label space (the identities are numbered in -s order); "
                   "pass -s synth_msmt synth_duke, or the checkpoint of a source run with -s synth_duke synth_msmt\n")
    assert not out.exists()
    init = source_run / "model.pt"  # trained on synth_msmt without --combineall
    assert main([*base, "-s", "synth_msmt", "--combineall", "--init", str(init)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass -s synth_msmt, or the checkpoint of a source run with -s synth_msmt " \
        "--combineall" in err
    assert not out.exists()


@pytest.mark.parametrize("command", [["train-source", "-s", "synth_msmt"], ADAPT, DISTILL], ids=lambda c: c[0])
def test_a_batch_of_one_group_is_refused_before_the_run_folder(command, synth_root, tmp_path, capsys):
    # Found by a review: --batch-size 4 --num-instances 4 trained with the triplet (and D-MMD's between-class
    # term) at 0 on every step, silently (P = 1: no negative, no pair of two groups).
    out = tmp_path / "runs" / "r"
    code = main([*(part.format(tmp=tmp_path) for part in command), "--root", str(synth_root), "--out", str(out),
                 *TINY, "--batch-size", "4", "--num-instances", "4"])
    err = capsys.readouterr().err
    assert code == 2 and err == ("kdreid: error: --batch-size 4 with --num-instances 4 gives one group per batch; "
                                 "the triplet and D-MMD losses need two or more: choose --batch-size at least 8 "
                                 "(P×K with P >= 2)\n"), err
    assert not (tmp_path / "runs").exists()


def test_a_share_of_one_group_per_process_is_refused_before_the_run_folder(synth_root, tmp_path, capsys,
                                                                            monkeypatch):
    # Found by a review: under torchrun each process computes the triplet and D-MMD on its own P/W groups; with
    # P/W = 1 (2 processes, --batch-size 8 --num-instances 4; or the presets' P=8 on 8 GPUs) the triplet was 0 at
    # every step, silently, as with P = 1 on one process.
    from kdreid import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    out = tmp_path / "runs" / "r"
    code = main(["train-source", "-s", "synth_msmt", "--root", str(synth_root), "--out", str(out), *TINY,
                 "--batch-size", "8", "--num-instances", "4"])
    err = capsys.readouterr().err
    assert code == 2 and err == ("kdreid: error: --batch-size 8 with --num-instances 4 gives each of the 2 processes "
                                 "one group per batch; the triplet and D-MMD losses, computed on each process's "
                                 "share, need two or more: choose --batch-size at least 16\n"), err
    assert not (tmp_path / "runs").exists()


def test_adapt_with_pseudo_labels_clusters_the_target(source_run, synth_root, tmp_path, monkeypatch):
    seen = []
    real = adapt.dbscan

    def spy(distances, eps, min_samples):
        labels = real(distances, eps, min_samples)
        seen.append(labels)
        return labels

    monkeypatch.setattr(adapt, "dbscan", spy)
    out = tmp_path / "pseudo"
    # A tight eps: the barely-trained tiny model sees everyone as alike, and eps 0.6 merges them all.
    config = resolve_config(adapt.AdaptConfig, "adapt", overrides={
        "sources": ["synth_msmt"], "targets": ["synth_duke"], "arch": "osnet_tiny",
        "init": str(source_run / "model.pt"), "out": str(out), "data.root": str(synth_root), "grouping": "pseudo",
        "pseudo.eps": 0.3, "pseudo.min_samples": 2, "train.device": "cpu", "train.epochs": 1,
        "train.height": 64, "train.width": 32, "train.batch_size": 16,
    })
    result = adapt.run(config)
    assert len(seen) == 1 and seen[0].max() >= 3  # one refresh per epoch, several clusters
    assert "pseudo" in (out / "results.md").read_text()
    assert set(result.final) == {"synth_duke", "synth_msmt"}

    # A clustering that finds fewer clusters than a batch's P: the answer names tracklets, the other grouping.
    monkeypatch.setattr(adapt, "dbscan", lambda distances, eps, min_samples: real(distances, eps, min_samples) * 0)
    # Found by a review: the clustering's settings, the first thing to change, were not named.
    with pytest.raises(DatasetError, match=r"^epoch 1: a batch of P=4 pseudo-labels needs at least that many, but "
                                           r"the data have 1; .*, or change the clustering \(now 1 clusters of 165 "
                                           r"images with pseudo.eps 0.3, pseudo.min_samples 2: set them in a --config "
                                           r"file\), or group the target by --grouping tracklet$"):
        adapt.run(config.__class__(**{**vars(config), "out": str(tmp_path / "few")}))


def test_a_resumed_run_keeps_the_datasets_record_of_its_start(tmp_path, monkeypatch):
    """Data regenerated between a crash and --resume: the run is refused in one line (its classifier and sampler
    positions are the first files'; going on was a size-mismatch or IndexError traceback when identities or images
    changed), and its record stays the first one; a fresh run records what it reads."""
    from types import SimpleNamespace

    from kdreid.stages import common

    current = {"synth_duke": "aaaa/tttt"}
    monkeypatch.setattr(common, "dataset_fingerprint", lambda dataset, root: current[dataset.name])
    warnings = []
    log = SimpleNamespace(warning=warnings.append)
    record, duke = tmp_path / "datasets.json", [SimpleNamespace(name="synth_duke")]
    config = SimpleNamespace(data=SimpleNamespace(root="root", combineall=False), sources=["synth_msmt"])
    assert common._record_datasets(record, duke, config, log, resuming=False) is False
    current["synth_duke"] = "bbbb/uuuu"  # other training images
    with pytest.raises(DatasetError, match="synth_duke hold other training images than when the run in .* began "
                                           r"\(regenerated or re-extracted\): restore the files it began with"):
        common._record_datasets(record, duke, config, log, resuming=True)
    assert json.loads(record.read_text()) == {"synth_duke": "aaaa/tttt"}
    common._record_datasets(record, duke, config, log, resuming=False)
    assert json.loads(record.read_text()) == {"synth_duke": "bbbb/uuuu"}
    # Only a query or gallery image replaced (after a failed evaluation): the record follows, with no warning.
    current["synth_duke"] = "cccc/uuuu"
    assert common._record_datasets(record, duke, config, log, resuming=True) is True  # numbers measured again
    assert json.loads(record.read_text()) == {"synth_duke": "cccc/uuuu"} and not warnings
    # A source under --combineall trains on its query and gallery too: that change is one of training images.
    config.data.combineall, config.sources = True, ["synth_duke"]
    current["synth_duke"] = "dddd/uuuu"
    with pytest.raises(DatasetError, match="hold other training images"):
        common._record_datasets(record, duke, config, log, resuming=True)
    assert json.loads(record.read_text()) == {"synth_duke": "cccc/uuuu"}
    # A damaged record: which files the run began with is unknown; it is written again, and the log says so.
    record.write_text("{not json")
    assert common._record_datasets(record, duke, config, log, resuming=True) is False
    assert json.loads(record.read_text()) == {"synth_duke": "dddd/uuuu"}
    assert warnings == [f"{record} was damaged: written again from the files read now"]


def test_what_the_ranking_warns_of_is_a_line_of_the_run_log_naming_the_dataset(monkeypatch, caplog):
    # Before: a raw Python warning on the console ("…/features.py:274: EvaluationWarning: …"), not in log.txt.
    import warnings

    from kdreid.evaluation.ranking import EvaluationWarning
    from kdreid.stages import common

    class Result:
        def summary(self):
            return {"mAP": 1.0}

    def ranked(*args, **kwargs):
        warnings.warn("2 of 5 queries have no true match in the gallery from another camera", EvaluationWarning)
        return Result()

    monkeypatch.setattr(common, "evaluate_model", ranked)
    log = logging.getLogger("test.evaluation")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may escape as a Python warning
        with caplog.at_level(logging.WARNING, logger="test.evaluation"):
            assert common.evaluate_split(None, [], [], height=8, width=4, device=torch.device("cpu"),
                                         options=common.EvalOptions(), name="synth_duke", log=log) == {"mAP": 1.0}
    assert caplog.messages == ["synth_duke: 2 of 5 queries have no true match in the gallery from another camera"]


def test_the_cuhk03_protocol_is_named_beside_its_numbers():
    from kdreid.stages.common import DataOptions, EvalOptions, how_measured

    classic = DataOptions(cuhk03_labeled=True, cuhk03_classic_split=True, cuhk03_split_id=3)
    assert how_measured(["cuhk03"], EvalOptions(metric="cosine", flip=True), classic) == (
        "cosine distances between flip-averaged embeddings; cuhk03 labeled boxes, classic split 3, single-gallery-shot "
        "CMC")
    new_protocol = how_measured(["cuhk03"], EvalOptions(), DataOptions())
    assert new_protocol.endswith("; cuhk03 detected boxes, the 767/700 protocol")


def test_a_resumed_stage_whose_gallery_changed_measures_its_numbers_again(synth_root, tmp_path):
    # After a failed evaluation the user replaces the image and resumes; resuming reported the numbers of the old
    # files (the checkpoint's) and recorded the new ones as measured. Nothing is trained again, and model.pt keeps
    # its checkpoint's time, so that a pipeline does not take the weights for retrained ones.
    data = tmp_path / "data"
    for name in ("synth_msmt", "synth_duke"):
        shutil.copytree(synth_root / name, data / name)
    out = tmp_path / "run"
    args = ["train-source", "-s", "synth_msmt", "-t", "synth_duke", "-a", "osnet_tiny", "--root", str(data),
            "--out", str(out), *TINY[:1], "1", *TINY[2:]]
    assert main(args) == 0
    before = json.loads((out / "metrics.json").read_text())["final"]["synth_duke"]
    queries = sorted((data / "synth_duke" / "query").glob("*.jpg"))
    for image in queries[: len(queries) // 2]:
        image.unlink()
    checkpoint_time = (out / "checkpoints" / "last.pt").stat().st_mtime_ns
    assert main([*args, "--resume"]) == 0
    after = json.loads((out / "metrics.json").read_text())["final"]["synth_duke"]
    expected = evaluate_model(load_checkpoint(out / "model.pt"), build_dataset("synth_duke", data), height=64,
                              width=32, device="cpu").summary()
    assert after != before and after["mAP"] == pytest.approx(expected["mAP"], abs=1e-4)
    assert "evaluating epoch 1's weights again: a query or gallery changed since" in (out / "log.txt").read_text()
    assert (out / "model.pt").stat().st_mtime_ns == checkpoint_time


def test_dmmd_counts_copies_of_one_image_by_default_as_the_original(source_run, synth_root, tmp_path, monkeypatch):
    told = []

    def spy(*args, source_images=None, target_images=None, **kwargs):
        told.append((source_images, target_images))
        return dmmd_terms(*args, source_images=source_images, target_images=target_images, **kwargs)

    monkeypatch.setattr(adapt, "dmmd_terms", spy)
    assert main(["adapt", "-s", "synth_msmt", "-t", "synth_duke", "--init", str(source_run / "model.pt"),
                 "--root", str(synth_root), "--out", str(tmp_path / "t"), "--dmmd-start", "0", *TINY]) == 0
    assert told and all(images == (None, None) for images in told)


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("kdreid: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_resume_is_checked_against_the_checkpoint_and_foreign_folders_are_refused(synth_root, tmp_path, capsys):
    """Found by a bad-input review: with config.yaml deleted, --resume took any settings; a checkpoint copied from
    another model's run was a traceback; a training --out into a pipeline's folder overwrote its results."""
    source = ["train-source", "-s", "synth_msmt", "--root", str(synth_root), *TINY[2:], "--epochs", "1"]
    run, other = tmp_path / "run", tmp_path / "other"
    assert main([*source, "-a", "osnet_tiny", "--out", str(run)]) == 0
    assert main([*source, "-a", "resnet_tiny", "--out", str(other)]) == 0
    capsys.readouterr()
    (run / "config.yaml").unlink()
    assert main([*source, "-a", "osnet_tiny", "--out", str(run), "--resume", "--lr", "0.01"]) == 2
    assert "was trained with other settings than this command's (train.optim.lr" in _one_error(capsys)
    shutil.copy(other / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt")
    assert main([*source, "-a", "osnet_tiny", "--out", str(run), "--resume"]) == 2
    assert "arch 'resnet_tiny' -> 'osnet_tiny'" in _one_error(capsys)  # the checkpoint's own settings
    pipeline_folder = tmp_path / "pipeline"
    (pipeline_folder / "stages").mkdir(parents=True)
    (pipeline_folder / "metrics.json").write_text('{"student": {}}')
    assert main([*source, "-a", "osnet_tiny", "--out", str(pipeline_folder)]) == 2
    assert "holds another run's files (metrics.json), not a checkpoint of this command" in _one_error(capsys)
    assert (pipeline_folder / "metrics.json").read_text() == '{"student": {}}'
    assert main(["pipeline", "-s", "synth_msmt", "-t", "synth_duke", "--root", str(synth_root), "--preset", "quick",
                 "--out", str(other)]) == 2
    assert "is a training run's folder (it holds model.pt), not a pipeline's" in _one_error(capsys)


def test_a_source_trained_on_all_its_splits_is_not_evaluated(synth_root, tmp_path):
    """Found by a review: --combineall trains on the source's query and gallery identities, which were then
    evaluated as if held out (a recall number in the source's row)."""
    out = tmp_path / "run"
    assert main(["train-source", "-s", "synth_msmt", "-t", "synth_duke", "-a", "osnet_tiny", "--root",
                 str(synth_root), "--out", str(out), "--combineall", *TINY[:1], "1", *TINY[2:]]) == 0
    assert list(json.loads((out / "metrics.json").read_text())["final"]) == ["synth_duke"]
    assert "synth_msmt is not evaluated: --combineall trains on its query and gallery too" in (
        out / "log.txt").read_text()


def test_the_triplet_and_dmmd_terms_see_the_embedding_before_bnneck(source_run, synth_root, tmp_path, monkeypatch):
    """Found by a review: computing the source triplet or the D-MMD terms on the BNNeck output passed every test.
    A BNNeck whose bias is -1000 puts the neck far below zero; the embedding (a pooled ReLU map) never is."""
    from kdreid.models import save_checkpoint
    from kdreid.stages import source

    model = load_checkpoint(source_run / "model.pt")
    model.bnneck.bias.data.fill_(-1000.0)
    init = save_checkpoint(tmp_path / "shifted.pt", model, extra={"stage": "source", "input_size": [64, 32]})
    seen = []

    def spy(real, *positions):
        def wrapper(*args, **kwargs):
            seen.append(min(float(args[i].detach().min()) for i in positions))
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(adapt, "batch_hard_triplet", spy(adapt.batch_hard_triplet, 0))
    monkeypatch.setattr(adapt, "dmmd_terms", spy(adapt.dmmd_terms, 0, 2))
    monkeypatch.setattr(source, "batch_hard_triplet", spy(source.batch_hard_triplet, 0))
    assert main(["adapt", "-s", "synth_msmt", "-t", "synth_duke", "--init", str(init), "--root", str(synth_root),
                 "--out", str(tmp_path / "t"), "--dmmd-start", "0", *TINY[:1], "1", *TINY[2:]]) == 0
    assert main(["train-source", "-s", "synth_msmt", "-a", "osnet_tiny", "--pretrained", str(init), "--root",
                 str(synth_root), "--out", str(tmp_path / "s"), *TINY[:1], "1", *TINY[2:]]) == 0
    assert len(seen) > 3 and min(seen) >= 0, seen


def test_the_target_cluster_score_is_the_mean_over_the_targets(monkeypatch):
    """--select target-clusters with several targets: each target's cluster quality counts alike (a review: a
    score of one target alone went unnoticed with the single-target runs of the other tests)."""
    from types import SimpleNamespace

    from kdreid.stages import common

    features = {"a": torch.zeros(2, 3), "b": torch.ones(4, 3)}
    monkeypatch.setattr(common, "extract_features",
                        lambda model, records, **options: SimpleNamespace(features=features[records[0]]))
    monkeypatch.setattr(common, "cluster_quality",
                        lambda f, settings: {"score": float(f.sum()), "clustered": float(len(f))})
    config = SimpleNamespace(train=SimpleNamespace(height=8, width=4), eval=SimpleNamespace(batch_size=2))
    targets = [SimpleNamespace(name=name, train=[name]) for name in ("a", "b")]
    assert common.target_cluster_quality(None, targets, config, "cpu") == {"score": 6.0, "clustered": 3.0}


def test_the_target_cluster_score_is_of_the_targets_alone(monkeypatch):
    """--select target-clusters: a label-free score of the targets' training images, never of a source's (a review:
    scoring every evaluated dataset passed every test, the single-target runs' source scores alike)."""
    from types import SimpleNamespace

    from kdreid.stages import common

    monkeypatch.setattr(common, "evaluate_datasets", lambda *args, **kwargs: {})
    monkeypatch.setattr(common, "extract_features",
                        lambda model, records, **options: SimpleNamespace(features=torch.full((2, 3), records[0])))
    monkeypatch.setattr(common, "cluster_quality", lambda f, settings: {"score": float(f[0, 0])})
    config = SimpleNamespace(train=SimpleNamespace(select="target-clusters", height=8, width=4),
                             eval=common.EvalOptions(), data=common.DataOptions(), sources=["s"], targets=["t"])
    datasets = [SimpleNamespace(name=name, train=[score], query=[], gallery=[]) for name, score in (("s", 10.0),
                                                                                                  ("t", 2.0))]
    evaluate = common.stage_evaluator(None, datasets, None, config, torch.device("cpu"), logging.getLogger("t"))
    assert evaluate(0) == {"target-clusters": {"score": 2.0}}


def test_source_val_ranks_the_held_out_queries_against_their_gallery(monkeypatch):
    """--select source-val chooses the epoch by these numbers: one query per (identity, camera) ranked against the
    rest, Market-style; swapped, every gallery image would be a query."""
    import logging
    from types import SimpleNamespace

    from kdreid.data.datasets.base import ImageRecord
    from kdreid.stages import common
    from kdreid.stages.data import hold_out_validation

    records = [ImageRecord(f"p{p}_c{c}_{i}.jpg", p, c) for p in range(10) for c in (1, 2) for i in range(3)]
    validation = hold_out_validation(records, 0.2, seed=0)
    seen = {}
    monkeypatch.setattr(common, "evaluate_datasets", lambda *args, **kwargs: {})
    monkeypatch.setattr(common, "evaluate_split", lambda model, query, gallery, **kwargs: seen.setdefault(
        kwargs["name"], (list(query), list(gallery))) and {"mAP": 0.0})
    config = SimpleNamespace(train=SimpleNamespace(select="source-val", height=8, width=4), eval=common.EvalOptions(),
                             data=common.DataOptions(), sources=["s"], targets=[])
    evaluate = common.stage_evaluator(None, [], validation, config, torch.device("cpu"), logging.getLogger("t"))
    assert set(evaluate(0)) == {"source-val"}
    assert seen["source-val"] == (validation.query, validation.gallery)
    assert len(validation.query) == 2 * 2 and len(validation.gallery) == 2 * 2 * 2


def test_adapt_from_a_source_run_that_held_out_identities_keeps_its_label_space(synth_root, tmp_path):
    """A review: adapting a source model trained with --select source-val, whose classifier has a row per kept
    identity only, went untested; without the same split rebuilt, adapt refused it (more source identities than
    rows) or, had the counts matched, paired rows with other identities."""
    from kdreid.stages.data import combine_train, hold_out_validation

    source, held = tmp_path / "source", tmp_path / "held.yaml"
    held.write_text("train:\n  source_val_ids: 0.2\n")  # 2 of synth_msmt's 10 identities
    common = ["--root", str(synth_root), "--select", "source-val", "--config", str(held), *TINY[:1], "1", *TINY[2:]]
    assert main(["train-source", "-s", "synth_msmt", "-a", "osnet_tiny", "--out", str(source), *common]) == 0
    model = load_checkpoint(source / "model.pt")
    held_out = model.kdreid_meta["extra"]["held_out"]
    validation = hold_out_validation(combine_train([build_dataset("synth_msmt", synth_root)]), held_out["fraction"],
                                     held_out["seed"])
    assert model.num_classes == len({r.pid for r in validation.train}) < len(
        {r.pid for r in build_dataset("synth_msmt", synth_root).train})
    out = tmp_path / "teacher"
    assert main(["adapt", "-s", "synth_msmt", "-t", "synth_duke", "--init", str(source / "model.pt"), "--out",
                 str(out), *common]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "source-val" in metrics["final"] and metrics["selection"].startswith("best source-val")


def test_a_dataset_needs_both_a_query_and_a_gallery_to_be_evaluated():
    from types import SimpleNamespace

    from kdreid.stages.common import evaluable

    image = ["x.jpg"]
    assert evaluable(SimpleNamespace(query=image, gallery=image))
    assert not any(evaluable(SimpleNamespace(query=q, gallery=g)) for q, g in ((image, []), ([], image), ([], [])))


def test_the_stage_evaluation_uses_the_runs_protocol_distance_flip_and_log(monkeypatch, caplog):
    """A review: evaluating the stage's datasets with the market protocol under --cuhk03-classic-split, without
    eval.flip, or without the run's log (the ranking's warnings then a Python warning, not a line of log.txt)
    passed every test; only the line under the results table named them."""
    import warnings
    from types import SimpleNamespace

    from kdreid.evaluation.ranking import EvaluationWarning
    from kdreid.stages import common

    seen = {}

    class Result:
        def summary(self):
            return {"mAP": 1.0}

    def ranked(model, split, **kwargs):
        seen[split.name] = kwargs
        warnings.warn("1 of 2 queries have no true match", EvaluationWarning)
        return Result()

    monkeypatch.setattr(common, "evaluate_model", ranked)
    data = common.DataOptions(cuhk03_classic_split=True)
    config = SimpleNamespace(train=SimpleNamespace(select="last", height=8, width=4), data=data, sources=["s"],
                             targets=["cuhk03", "t"], eval=common.EvalOptions(metric="cosine", flip=True,
                                                                              batch_size=3))
    datasets = [SimpleNamespace(name=name, query=["q.jpg"], gallery=["g.jpg"]) for name in ("cuhk03", "t")]
    log = logging.getLogger("test.stage_evaluation")
    evaluate = common.stage_evaluator(torch.nn.Identity(), datasets, None, config, torch.device("cpu"), log)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.WARNING, logger="test.stage_evaluation"):
            assert evaluate(0) == {"cuhk03": {"mAP": 1.0}, "t": {"mAP": 1.0}}
    assert {name: kwargs["protocol"] for name, kwargs in seen.items()} == {"cuhk03": "cuhk03", "t": "market"}
    assert all(kwargs["metric"] == "cosine" and kwargs["flip"] is True and kwargs["batch_size"] == 3
               for kwargs in seen.values())
    assert sorted(caplog.messages) == [f"{name}: 1 of 2 queries have no true match" for name in ("cuhk03", "t")]


def test_a_stage_reads_cuhk03_with_its_flags(tmp_path, monkeypatch, capsys):
    """A review: --cuhk03-labeled, --cuhk03-classic-split and --split-id not reaching the CUHK03 reader (the detected
    boxes of the new protocol read instead, under a results line naming the flags) passed every test."""
    from kdreid.stages import data

    read = []

    def reader(name, root, **options):
        read.append((name, options))
        raise DatasetError(f"{name}: not here")

    monkeypatch.setattr(data, "build_dataset", reader)
    assert main(["train-source", "-s", "cuhk03", "-t", "synth_duke", "-a", "osnet_tiny", "--root", str(tmp_path),
                 "--out", str(tmp_path / "run"), "--cuhk03-labeled", "--cuhk03-classic-split", "--split-id", "3",
                 *TINY]) == 2
    assert "cuhk03: not here" in capsys.readouterr().err
    assert read == [("cuhk03", {"labeled": True, "classic_split": True, "split_id": 3})]


def test_the_target_cluster_score_clusters_with_the_runs_pseudo_label_settings(monkeypatch):
    """The label-free score clusters as the run's --pseudo-* settings say (adapt's), the defaults only without."""
    from types import SimpleNamespace

    from kdreid.stages import common
    from kdreid.stages.pseudo_labels import PseudoLabelConfig

    told = []
    monkeypatch.setattr(common, "extract_features",
                        lambda model, records, **options: SimpleNamespace(features=torch.zeros(2, 3)))
    monkeypatch.setattr(common, "cluster_quality", lambda f, settings: told.append(settings) or {"score": 1.0})
    targets = [SimpleNamespace(name="t", train=["t.jpg"])]
    own = PseudoLabelConfig(eps=0.25, min_samples=2)
    config = SimpleNamespace(train=SimpleNamespace(height=8, width=4), eval=SimpleNamespace(batch_size=2), pseudo=own)
    common.target_cluster_quality(None, targets, config, "cpu")
    del config.pseudo
    common.target_cluster_quality(None, targets, config, "cpu")
    assert told[0] is own and told[1] == PseudoLabelConfig()


def test_the_settings_a_resume_is_checked_against_are_last_pt_s_then_previous_pt_s(tmp_path):
    """The training loop resumes from last.pt, or previous.pt when last.pt is damaged: its settings are the ones to
    compare (a review: reading previous.pt first, or giving up at a damaged last.pt, passed every test)."""
    from kdreid.stages.common import _trained_settings
    from kdreid.stages.loop import checkpoint_file, save_training_state

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("arch: from_yaml\n")
    assert _trained_settings(run) == {"arch": "from_yaml"}
    state = {"epoch": 1, "modules": {}, "optimizer": {}, "rng": {}}
    save_training_state(checkpoint_file(run), {**state, "config": {"arch": "older"}})
    save_training_state(checkpoint_file(run), {**state, "config": {"arch": "newer"}})  # the first: previous.pt
    assert _trained_settings(run) == {"arch": "newer"}
    checkpoint_file(run).write_bytes(checkpoint_file(run).read_bytes()[:-5])  # truncated
    assert _trained_settings(run) == {"arch": "older"}


def test_a_stage_records_its_relative_paths_as_absolute(synth_root, tmp_path, monkeypatch):
    """config.yaml names the data root and input files absolute: `--resume` or `kdreid report` from another working
    directory reads the same files (a review: the stages' own conversion went untested, only the pipeline's)."""
    from kdreid.stages import common

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(common, "load_datasets", stop)  # after config.yaml is written; not a KdreidError: it stays
    monkeypatch.chdir(synth_root.parent)
    out = tmp_path / "run"
    with pytest.raises(Stop):
        main(["train-source", "-s", "synth_msmt", "-a", "osnet_tiny", "--root", synth_root.name, "--pretrained",
              "weights.pt", "--out", str(out), *TINY])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["root"] == str(synth_root)
    assert saved["pretrained"] == str(synth_root.parent / "weights.pt")


def test_files_the_reader_left_out_are_named_by_the_commands_that_go_on_without_them(synth_root, tmp_path, capsys):
    # One's own crops: a stray file whose name does not parse was skipped in silence (only `data check` said so),
    # and the run trained and evaluated on less than the user gave it.
    folder = tmp_path / "data" / "custom"
    duke = synth_root / "synth_duke"
    for split, released in (("train", "bounding_box_train"), ("query", "query"), ("gallery", "bounding_box_test")):
        shutil.copytree(duke / released, folder / split)
    shutil.copy(next((folder / "train").glob("*.jpg")), folder / "train" / "IMG_0001.jpg")
    out = tmp_path / "run"
    assert main(["train-source", "-s", "custom", "-a", "osnet_tiny", "--root", str(folder), "--out", str(out),
                 *TINY[2:], "--epochs", "1"]) == 0
    note = "custom: 1 file or row left out while reading it (e.g. "
    assert note in capsys.readouterr().err
    assert f"{note}{folder / 'train' / 'IMG_0001.jpg'}: file name does not match" in (out / "log.txt").read_text()
    assert main(["evaluate", "--model", str(out / "model.pt"), "-t", "custom", "--root", str(folder),
                 "--device", "cpu"]) == 0
    assert f"kdreid: warning: {note}" in capsys.readouterr().err


@pytest.mark.parametrize("main_process", [True, False], ids=["main", "other-process"])
@pytest.mark.parametrize("before", [(False, False), (True, True)], ids=["off", "warn-only"])
def test_a_stage_puts_back_the_process_wide_torch_switches_it_set(tmp_path, monkeypatch, main_process, before):
    # A deterministic stage left every later one in the process deterministic: a pipeline's next stages, or the
    # caller's own torch code (where an operation without a deterministic CUDA kernel then raises). On every
    # process of torchrun's: the others' next stages ran deterministic where the main one's did not.
    from kdreid import distributed
    from kdreid.stages import loop, source

    monkeypatch.setattr(distributed, "is_main", lambda: main_process)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    seen = []

    def seeded(seed, deterministic):
        real_seed(seed, deterministic)
        torch.backends.cudnn.benchmark = True  # as tune_backends does on CUDA
        seen.append(torch.are_deterministic_algorithms_enabled())

    real_seed = loop.seed_everything
    monkeypatch.setattr("kdreid.stages.common.seed_everything", seeded)
    config = resolve_config(source.SourceConfig, "source", overrides={
        "out": str(tmp_path / "run"), "data.root": str(tmp_path / "no-data"), "sources": ["synth_duke"],
        "train.deterministic": True})
    try:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])  # the caller's own (warn_only: warns)
        with pytest.raises(DatasetError):  # after seeding: the dataset is not there
            source.run(config)
        after = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    finally:
        torch.use_deterministic_algorithms(False)
    assert seen == [True]
    assert after == before and torch.backends.cudnn.benchmark is False
