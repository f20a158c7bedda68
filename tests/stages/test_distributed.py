"""Several processes with the gloo backend on the CPU: the pieces (BatchNorm over the global batch, gradient
averaging, gathering) against one process holding the whole batch, then a real `torchrun` run of a stage
against a one-process run with the same global batch."""

import functools
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from kdreid import distributed
from kdreid.cli import main
from kdreid.errors import ConfigError, DatasetError
from kdreid.losses import cross_entropy_label_smoothing
from kdreid.models import build_model, load_checkpoint
from kdreid.stages import source
from kdreid.stages.loop import TrainingInterrupted
from kdreid.stages.presets import resolve_config

WORLD = 2


# ------------------------------------------------------------------------------------------------ helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, function, folder: str) -> None:
    # What torchrun would set; kdreid.distributed.init reads it as it does under torchrun.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="test")
    torch.set_num_threads(1)
    assert distributed.init("cpu") and distributed.world_size() == world and distributed.rank() == rank
    try:
        torch.save(function(folder), Path(folder) / f"rank{rank}.pt")
        # As the CLI marks a command that ended well: leaving waits for the others (a process that tore its gloo
        # connections down while a peer still used them made that peer abort, SIGABRT, about one run in three).
        distributed.mark_ended_together(True)
    finally:
        distributed.cleanup()
    # Its result saved and the group left: end as the kdreid command does, without the interpreter's teardown, where
    # gloo's threads still aborted a process now and then (SIGABRT at exit, about one full suite in five under CI's
    # load, never in this test's own checks); a process that failed above still reports its traceback to mp.spawn.
    distributed.end_process(0)


def _on_processes(function, folder: Path, world: int = WORLD) -> list:
    """Run `function(folder)` in `world` gloo processes; -> what each returned, in rank order."""
    mp.spawn(_worker, args=(world, _free_port(), function, str(folder)), nprocs=world)
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 5),
    )


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 6, 5, generator=generator) * 2 + 1  # (8, 3, 6, 5), mean 1, std 2
    images[4:] += 3  # the two halves differ: per-process statistics would not be the global ones
    return images, torch.randint(0, 5, (8,), generator=generator)


def _step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(images)
    F.cross_entropy(logits, labels).backward()  # a mean over this process's share of the batch
    return logits.detach()


def _osnet_step() -> tuple[float, dict]:
    """One cross-entropy step of kdreid's smallest re-ID model on a P×K batch of 4 groups (2 per process)."""
    torch.manual_seed(0)
    model = distributed.sync_batchnorm(build_model("osnet_tiny", 10, pretrained="none").train())
    generator = torch.Generator().manual_seed(3)
    images, labels = torch.rand(16, 3, 64, 32, generator=generator), torch.arange(4).repeat_interleave(4)
    mine = distributed.shard(len(images))
    loss = cross_entropy_label_smoothing(model(images[mine.start:mine.stop]).logits, labels[mine.start:mine.stop])
    loss.backward()
    distributed.average_gradients(model.parameters())
    loss = distributed.mean_across_ranks({"loss": float(loss.detach())})["loss"]
    return loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _synced_step_and_collectives(folder: str) -> dict:
    model = distributed.sync_batchnorm(_tiny_model())
    images, labels = _global_batch()
    mine = distributed.shard(len(images))
    logits = _step(model, images[mine.start:mine.stop], labels[mine.start:mine.stop])
    distributed.average_gradients(model.parameters())
    rank = distributed.rank()
    try:  # P = 12 / 4 = 3 groups cannot be shared by two processes: refused before anything is written
        source.run(resolve_config(source.SourceConfig, "source", overrides={
            "out": str(Path(folder) / "refused"), "train.batch_size": 12, "train.num_instances": 4}))
        refusal = ""
    except ConfigError as error:
        refusal = str(error)
    return {
        "refusal": refusal,
        "osnet": _osnet_step(),
        "shard": (mine.start, mine.stop),
        "logits": logits,
        "grads": {name: p.grad.clone() for name, p in model.named_parameters()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "synced": sum(isinstance(m, distributed.SyncBatchNorm) for m in model.modules()),
        # Shards of different lengths, one of them empty and shapeless, as extraction can give.
        "gathered": distributed.gather_rows(torch.arange(6.0).view(3, 2) if rank == 0 else torch.zeros(0, 0)),
        "means": distributed.mean_across_ranks({"a": float(rank), "b": 10.0 * rank}),
        "broadcast": distributed.broadcast_array(np.array([rank + 1, 7], dtype=np.int64)).tolist(),
        "stop": _stop_agreement(rank),
        "max": distributed.max_across_ranks(rank + 2),  # a sum (5) or this process's own would differ
        # Two non-empty shards of different lengths: in rank order, each cut to its own length.
        "gathered_both": distributed.gather_rows(torch.arange(6.0).view(3, 2) if rank == 0 else
                                                 torch.tensor([[10.1, 11.3]])),  # float32 values kept exactly
        "eval_logits": _eval_logits(),
        "broadcast_weights": _broadcast_weights(rank),
        "optimiser_keeps_its_tensors": _optimiser_keeps_its_tensors(),
        "diverged": _divergence_seen(rank),
    }


def _eval_logits() -> torch.Tensor:
    model = distributed.sync_batchnorm(_tiny_model()).eval()
    images, _ = _global_batch()
    mine = distributed.shard(len(images))
    with torch.no_grad():
        return model(images[mine.start:mine.stop])


def _optimiser_keeps_its_tensors() -> bool:
    """An optimiser made before sync_batchnorm still steps the BatchNorm weights the synced model uses."""
    model = _tiny_model()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    distributed.sync_batchnorm(model)
    held = {id(p) for group in optimiser.param_groups for p in group["params"]}
    return isinstance(model[1], distributed.SyncBatchNorm) and {id(p) for p in model.parameters()} == held


def _broadcast_weights(rank: int) -> dict:
    """Every process builds its model from another seed; broadcast_modules gives all of them process 0's."""
    torch.manual_seed(rank)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[1].running_mean.fill_(rank + 1.0)
    distributed.broadcast_modules([model])
    return {k: v.clone() for k, v in model.state_dict().items()}


def _divergence_seen(rank: int) -> str:
    """check_same_weights on the same weights (silent), then on weights that differ in one buffer of process 1."""
    model = _tiny_model()
    distributed.check_same_weights([model])
    if rank == 1:
        with torch.no_grad():
            model[1].running_mean[2] += 1e-3
    try:
        distributed.check_same_weights([model])
    except RuntimeError as error:
        return str(error)
    return ""


def _stop_agreement(rank: int) -> tuple:
    """A signal seen by one process only: every process must decide to stop at the same step, with it."""
    from kdreid.stages.loop import _GracefulStop

    quiet, signalled = _GracefulStop(), _GracefulStop()
    if rank == 1:
        signalled.signal = 15
    return quiet.requested(), signalled.requested(), signalled.signal


# ------------------------------------------------------------------------------------------------ the pieces
def _extraction_with_one_bad_image(folder: str) -> tuple:
    """Embed four images, the last of which (in process 1's share) does not decode. -> (the error's message, True) when
    every process raised it, marked as such; the features' shape when none was raised."""
    from PIL import Image

    from kdreid.evaluation.features import extract_features

    paths = [Path(folder) / f"{index}.jpg" for index in range(4)]
    if distributed.is_main():
        for path in paths:
            Image.new("RGB", (8, 16), (40, 80, 120)).save(path)
        paths[-1].write_bytes(paths[-1].read_bytes()[:40])  # truncated
    distributed.barrier()
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    try:
        return tuple(extract_features(model, [str(p) for p in paths], height=16, width=8, device="cpu",
                                      workers=1).features.shape)
    except DatasetError as error:
        if not getattr(error, "on_every_process", False):
            raise  # raised by this process alone: the other waits in the gathering (or dies in it when this one exits)
        return str(error), True


def test_an_image_that_fails_on_one_process_fails_every_process_at_once(tmp_path):
    # The other process waited in the gathering of the features for the one whose share held the image, and died
    # there with gloo's "Connection closed by peer" traceback once it exited; in a training stage the main process
    # never wrote the checkpoint (evaluation_pending) that the failed process's message said to --resume from.
    for message, together in _on_processes(_extraction_with_one_bad_image, tmp_path):
        assert message.startswith(f"image {tmp_path / '3.jpg'} cannot be decoded") and together


def test_processes_together_equal_one_process_on_the_global_batch(tmp_path):
    ranks = _on_processes(_synced_step_and_collectives, tmp_path)
    reference = _tiny_model()
    images, labels = _global_batch()
    logits = _step(reference, images, labels)

    assert [r["shard"] for r in ranks] == [(0, 4), (4, 8)] and all(r["synced"] == 2 for r in ranks)
    # Forward: BatchNorm normalised each share with the global batch's statistics.
    torch.testing.assert_close(torch.cat([r["logits"] for r in ranks]), logits, atol=1e-5, rtol=1e-5)
    # Per-process statistics would give visibly different outputs: the comparison above can fail.
    halves = torch.cat([_tiny_model().train()(images[:4]), _tiny_model().train()(images[4:])]).detach()
    assert (halves - logits).abs().max() > 1e-2
    for r in ranks:
        # Backward: the averaged gradients are those of the global batch's mean loss, through the statistics.
        for name, param in reference.named_parameters():
            torch.testing.assert_close(r["grads"][name], param.grad, atol=1e-5, rtol=1e-4, msg=name)
        # Running statistics (unbiased variance of the global batch), the same on every process.
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(r["state"][key], value, atol=1e-6, rtol=1e-5, msg=key)
        torch.testing.assert_close(r["gathered"], torch.arange(6.0).view(3, 2))
        assert r["means"] == {"a": 0.5, "b": 5.0}
        assert r["broadcast"] == [1, 7]
        assert r["stop"] == (False, True, 15)
        assert r["max"] == 3 and r["optimiser_keeps_its_tensors"]
        torch.testing.assert_close(r["gathered_both"], torch.tensor([[0.0, 1], [2, 3], [4, 5], [10.1, 11.3]]),
                                   rtol=0, atol=0)
        # In eval mode BatchNorm uses its running statistics, not the batch's, on several processes too.
        torch.testing.assert_close(torch.cat([r["eval_logits"] for r in ranks]), _tiny_model().eval()(images))
        torch.manual_seed(0)
        first = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))  # process 0's model
        for key, value in first.state_dict().items():
            torch.testing.assert_close(r["broadcast_weights"][key], value if key != "1.running_mean" else
                                       torch.ones(2), msg=key)
        assert r["diverged"].startswith("process 1 holds other weights than process 0 (first: 0.1.running_mean)")
        assert "a batch of P=3 groups cannot be shared by 2 processes" in r["refusal"]
    assert not (tmp_path / "refused").exists()

    # The same with osnet_tiny (30 BatchNorms, BNNeck). Its ReLUs and max-pool make the gradient discontinuous:
    # float rounding (one process or two) moves a handful of activations across a kink, and each such crossing
    # changes a few gradient entries outright (measured: 5e-4 of the gradient's norm; per-process BatchNorm
    # statistics or unaveraged gradients are off by far more). Hence a norm-relative tolerance of 1e-2.
    loss, grads = _osnet_step()
    for r in ranks:
        assert r["osnet"][0] == pytest.approx(loss, abs=1e-5)
        difference = sum(float((r["osnet"][1][n] - g).double().norm() ** 2) for n, g in grads.items()) ** 0.5
        assert difference < 1e-2 * sum(float(g.double().norm() ** 2) for g in grads.values()) ** 0.5


def test_a_process_alone_changes_nothing():
    model = _tiny_model()
    assert not distributed.launched() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.sync_batchnorm(model) is model and not any(
        isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert distributed.shard(5) == range(0, 5)
    rows = torch.ones(2, 3)
    assert distributed.gather_rows(rows) is rows and distributed.mean_across_ranks({"a": 2.0}) == {"a": 2.0}


# ------------------------------------------------------------------------------------------------ a stage under torchrun
# SGD without warm-up, no augmentation (each process draws its own) and a triplet margin no pair reaches (the
# batch-hard triplet mines negatives within each process's share by design, docs/distributed.md): left is what
# must agree with one process holding the global batch. Not to float precision for long: this tiny model
# amplifies rounding differences (ReLU and max-pool kinks) so fast that at a learning rate of 0.01 two ONE-process
# runs differing only in their thread count end as far apart after two epochs (measured ‖Δw‖ 4.2) as a
# two-process run from a one-process one (4.3). At 0.001 the first epoch's mean loss agrees to 2e-6 (tolerance
# 1e-4) and the second's to 1.3e-3 (tolerance 1e-2); mAP agreed to 0.6 points (tolerance 3). Exactness is
# tested step by step above; fit itself checks at every epoch end that the processes hold identical weights.
CE_ONLY = """
triplet_margin: -1000.0
train:
  optim: {optimizer: sgd, lr: 0.001, warmup_epochs: 0, scheduler: constant}
  augment: {flip: 0.0, pad: 0, erase: 0.0}
"""


# One torchrun launch (each start costs seconds of imports): the CLI's main() trains the first epoch, then is
# called again with --resume, which every process continues from the checkpoint the main process wrote; then
# adapts that model with pseudo-labels (clustered from gathered features, the main process's labels for all).
FIRST_THEN_RESUME = """
import os, shutil, sys
from kdreid.cli import main
flags, copy = sys.argv[1:-1], sys.argv[-1]
out = flags[flags.index("--out") + 1]
assert main([*flags, "--epochs", "1"]) == 0
if os.environ["RANK"] == "0":
    shutil.copy(os.path.join(out, "model.pt"), copy)
assert main([*flags, "--epochs", "2", "--resume"]) == 0
common = flags[flags.index("--batch-size"):]
assert main(["adapt", "-s", "synth_duke", "-t", "synth_msmt", "--init", os.path.join(out, "model.pt"),
             "--root", flags[flags.index("--root") + 1], "--out", out + "_adapt", "--grouping", "pseudo",
             "--config", os.path.join(os.path.dirname(copy), "pseudo.yaml"), "--epochs", "1", *common]) == 0
from kdreid import distributed
distributed.end_process(0)  # as the kdreid command ends a torchrun process
"""
PSEUDO = """
pseudo: {eps: 0.3, min_samples: 2}
histogram_images: 50
"""


def _source_flags(root, out, config):
    return ["train-source", "-s", "synth_duke", "-a", "osnet_tiny", "--root", str(root), "--out", str(out),
            "--config", str(config), "--batch-size", "16", "--num-instances", "4", "--height", "64", "--width",
            "32", "--device", "cpu", "--seed", "0"]


def _launched_by_torchrun(monkeypatch, rank: int, world: int) -> None:
    for name, value in dict(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29500", TORCHELASTIC_RUN_ID="test").items():
        monkeypatch.setenv(name, value)


def test_a_process_of_torchrun_that_joins_no_group_has_every_item(monkeypatch):
    # RANK without a process group made process 1 of 2 take the slice past the end: extract_features in a script
    # under torchrun (or `kdreid report` there) embedded no image and failed with "need at least one array to stack".
    _launched_by_torchrun(monkeypatch, rank=1, world=2)
    assert not distributed.is_distributed() and distributed.rank() == 1
    assert distributed.shard(5) == range(0, 5)


@pytest.mark.parametrize("argv", [["models"], ["report", "run"], ["data", "check", "--root", "r", "-d", "synth_duke"]],
                         ids=["models", "report", "data-check"])
def test_other_commands_than_training_are_refused_under_torchrun(monkeypatch, capsys, argv):
    # Each process ran the whole command: two `evaluate --out` or `report` processes raced for one folder (one was
    # refused as "in use by another kdreid process", its twin) and every line was printed once per process.
    from kdreid import cli

    monkeypatch.setattr(cli, "_run_models", lambda args: pytest.fail("ran"))
    _launched_by_torchrun(monkeypatch, rank=1, world=2)
    assert main(argv) == 2
    name = " ".join(argv[:2] if argv[0] == "data" else argv[:1])
    assert capsys.readouterr().err == (
        f"kdreid: error: kdreid {name} runs as one process, and torchrun started 2: run it without torchrun (only "
        "train-source, adapt, distill, pipeline share their work among torchrun's processes)\n")
    monkeypatch.setenv("WORLD_SIZE", "1")  # `torchrun --nproc_per_node=1`: one process, which runs it
    monkeypatch.setenv("RANK", "0")
    if argv == ["models"]:
        with pytest.raises(pytest.fail.Exception, match="ran"):
            main(argv)
        # Variables left in a shell (no torchrun: no TORCHELASTIC_RUN_ID): one process, which runs it.
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.delenv("TORCHELASTIC_RUN_ID")
        with pytest.raises(pytest.fail.Exception, match="ran"):
            main(argv)


def test_only_the_main_process_makes_a_stage_folder(monkeypatch, tmp_path):
    # In a pipeline the processes have joined before a stage begins: another process that made the stage's folder
    # before the main one looked at it made the main one keep the config.yaml, log.txt and datasets.json of a stage
    # stopped (Ctrl-C) or failed before its first checkpoint, as if the folder had been there before.
    from kdreid.errors import KdreidError
    from kdreid.stages.common import begin_stage

    monkeypatch.setattr(distributed, "is_main", lambda: False)
    config = resolve_config(source.SourceConfig, "source", overrides={
        "out": str(tmp_path / "stage"), "data.root": str(tmp_path / "no-data"), "sources": ["synth_duke"]})
    with pytest.raises(KdreidError, match="does not exist"):
        begin_stage(config, resume=False)
    assert not (tmp_path / "stage").exists()


def test_torchrun_variables_left_in_a_shell_are_named_before_the_wait(monkeypatch, capsys):
    # Variables left in a shell make a plain command wait for processes that never come: it says so first.
    joined = []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *args, **kwargs: joined.append(args))
    monkeypatch.setattr(distributed.atexit, "register", lambda function: None)
    monkeypatch.setattr(distributed, "is_distributed", lambda: False)
    for name, value in dict(RANK="1", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="node7", MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert distributed.init("cpu") and joined == [("gloo",)]
    assert capsys.readouterr().err == (
        "kdreid: warning: joining 4 processes at node7:29500 as process 1, because RANK, WORLD_SIZE, LOCAL_RANK, "
        "MASTER_ADDR and MASTER_PORT are set and torchrun did not start this one; for a single process, unset them\n"
    )
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # what torchrun sets: no warning
    assert distributed.init("cpu") and capsys.readouterr().err == ""
    # `torchrun --nproc_per_node=1`: one process, which joins no group and runs as a plain one.
    joined.clear()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert not distributed.launched() and not distributed.init("cpu") and joined == []


def _raises(error: Exception):
    def run(args):
        raise error
    return run


def _on_every_process(error: Exception) -> Exception:
    error.on_every_process = True  # as extract_features marks an error the processes agreed on
    return error


@pytest.mark.parametrize("run, together", [
    (lambda args: 0, True),
    (lambda args: 2, False),
    (_raises(ConfigError("bad flag")), False),
    (_raises(TrainingInterrupted("stopped after its checkpoint", signal.SIGTERM)), True),
    (_raises(_on_every_process(DatasetError("image q.jpg cannot be decoded"))), True),
], ids=["succeeded", "failed", "refused", "stopped-at-a-signal", "failed-on-every-process"])
def test_processes_wait_for_each_other_at_exit_only_after_ending_together(monkeypatch, run, together):
    # Leaving without waiting made a peer whose gloo threads still used the connections abort (SIGABRT) at exit:
    # after a training stopped at a signal too, which every process reaches at the same step. After a failure
    # the others may never come, so waiting there would hang.
    from kdreid import cli

    monkeypatch.setattr(distributed, "_ended_together", not together)
    monkeypatch.setattr(cli, "_run_models", run)
    main(["models"])
    assert distributed._ended_together is together
    waited = []
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: waited.append(True))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: None)
    distributed.cleanup()
    assert waited == ([True] if together else [])


def test_the_command_ends_a_torchrun_process_without_pythons_teardown(monkeypatch):
    # Python's teardown aborted a torchrun process now and then after a command had succeeded (gloo's threads:
    # SIGABRT, "terminate called without an active exception"), and torchrun reported the run as failed.
    from kdreid import cli

    ended = []
    monkeypatch.setattr(sys, "argv", ["kdreid", "models"])
    monkeypatch.setattr(cli, "_run_models", lambda args: 3)
    monkeypatch.setattr(distributed, "end_process", ended.append)
    assert cli.command() == 3 and ended == []  # one process: the interpreter ends it as usual
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    cli.command()
    assert ended == [3]  # with the command's exit status


END_PROCESS = """
import logging, logging.handlers, sys
from kdreid import distributed
log = logging.getLogger("kdreid.test")
log.addHandler(logging.handlers.MemoryHandler(100, target=logging.FileHandler(sys.argv[1])))  # writes when closed
log.warning("written before the end")
print("the last words", end="")  # buffered: a pipe, and no newline
distributed.end_process(3)
print("never printed")
"""


def test_ending_a_process_flushes_the_console_and_the_logs_first(tmp_path):
    log = tmp_path / "log.txt"
    buffered = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-c", END_PROCESS, str(log)], capture_output=True, text=True,
                          timeout=60, env=buffered)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "the last words"
    assert log.read_text() == "written before the end\n"


def test_a_device_the_processes_cannot_share_is_refused_before_joining(monkeypatch):
    joined = []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *args, **kwargs: joined.append(args))
    monkeypatch.setattr(distributed.atexit, "register", lambda function: None)
    monkeypatch.setattr(distributed, "is_distributed", lambda: False)
    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500",
                            TORCHELASTIC_RUN_ID="test").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device cuda asked for CUDA, but no GPU is visible"):
        distributed.init("cuda")
    assert distributed.init("auto") and joined == [("gloo",)]  # no GPU: gloo on the CPU
    joined.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: joined.append(("device", index)))
    with pytest.raises(ConfigError, match="--device cuda:0 would put every process on one GPU"):
        distributed.init("cuda:0")
    with pytest.raises(ConfigError, match="process 1 has LOCAL_RANK 1 but this node shows 1 GPU"):
        distributed.init("cuda")
    assert joined == []
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.init("cuda") and joined == [("device", 0), ("nccl",)]
    # A second node: process 3 of 4 is the second on its node, whose GPU is its LOCAL_RANK, not its RANK.
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 3)
    assert distributed.device_for(torch.device("cuda")) == torch.device("cuda", 1)
    assert distributed.device_for(torch.device("cuda", 0)) == torch.device("cuda", 0)  # as asked


def test_train_source_on_two_processes_agrees_with_one_process_and_resumes(synth_root, tmp_path):
    config, script = tmp_path / "ce_only.yaml", tmp_path / "first_then_resume.py"
    config.write_text(CE_ONLY)
    script.write_text(FIRST_THEN_RESUME)
    (tmp_path / "pseudo.yaml").write_text(PSEUDO)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*_source_flags(synth_root, one, config), "--epochs", "2"]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               str(script), *_source_flags(synth_root, two, config), str(tmp_path / "epoch1.pt")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes: each trains on 8 images of every global batch of 16" in done.stderr
    assert "continuing at epoch 2" in done.stderr

    metrics = {name: json.loads((run / "metrics.json").read_text()) for name, run in (("one", one), ("two", two))}
    # The logged losses are means over the processes, i.e. over the global batch.
    for epoch_one, epoch_two, tolerance in zip(metrics["one"]["epochs"], metrics["two"]["epochs"], (1e-4, 1e-2),
                                               strict=True):
        assert epoch_two["losses"]["ce"] == pytest.approx(epoch_one["losses"]["ce"], abs=tolerance)
    # Evaluation: features extracted in shards by the two processes and gathered.
    assert metrics["two"]["final"]["synth_duke"]["mAP"] == pytest.approx(
        metrics["one"]["final"]["synth_duke"]["mAP"], abs=3.0)
    # The resumed epoch trained, from the first epoch's weights.
    after_first, final = (load_checkpoint(path).state_dict() for path in (tmp_path / "epoch1.pt", two / "model.pt"))
    moved = max(float((final[k] - v).abs().max()) for k, v in after_first.items() if "running" not in k)
    assert moved > 1e-4
    # Only the main process wrote: one line per epoch in the log, one TensorBoard file per run.
    log = (two / "log.txt").read_text()
    assert log.count("epoch 1/1 ") == 1 and log.count("epoch 2/2 ") == 1
    assert len(list((two / "tensorboard").glob("events.*"))) == 2

    # D-MMD adaptation with pseudo-labels ran on both processes; its files were written once.
    adapted = tmp_path / "two_adapt"
    assert "pseudo-labels:" in done.stderr and (adapted / "model.pt").is_file()
    assert json.loads((adapted / "metrics.json").read_text())["grouping"] == "pseudo"
    assert {"mmd_within", "mmd_between", "mmd_features"} <= set(
        json.loads((adapted / "metrics.json").read_text())["epochs"][0]["losses"])
    assert (adapted / "distances_after.npz").is_file()


def test_the_pipeline_on_two_processes_decides_each_stage_once_and_prints_once(synth_root, tmp_path):
    # Each process used to look at a stage's folder on its own: one that looked after the other had begun
    # writing there removed it and waited in another collective (a deadlock); then a process printed the results
    # table before the main one had written it.
    out = tmp_path / "pipeline"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", "-m",
               "kdreid.cli", "pipeline", "-s", "synth_msmt", "-t", "synth_duke", "--teacher-arch", "osnet_tiny",
               "--student-arch", "mobilenetv2_tiny", "--root", str(synth_root), "--out", str(out), "--preset",
               "quick", "--epochs", "1", "--batch-size", "16", "--num-instances", "4", "--height", "64", "--width",
               "32", "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "removing" not in done.stderr  # a fresh run removes nothing
    assert done.stdout.count("| KD-ReID student (mobilenetv2_tiny)") == 1
    assert (out / "results.md").is_file() and (out / "stages" / "distill" / "model.pt").is_file()



def _fit_with_a_cached_group(folder: Path, resume: bool = False) -> tuple[torch.Tensor, dict]:
    """fit on this process's share: a group of two steps' data drawn at the group's first step from this process's
    stream (as distill caches a group of batches), kept as a resumable. -> (weights, the epoch's logged losses)."""
    import logging

    from kdreid.rundir import RunDir
    from kdreid.stages.loop import TrainConfig, fit
    from kdreid.stages.optim import OptimConfig, build_optimizer

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    config = TrainConfig(epochs=1, device="cpu", optim=OptimConfig(optimizer="sgd", lr=0.1, warmup_epochs=0))
    optimizer = build_optimizer(model.parameters(), config.optim)
    cache = {"group": None}

    def step(context):
        if context.iteration % 2 == 0:
            cache["group"] = torch.randn(4, 3, generator=context.generator) + distributed.rank()
        return {"loss": model(cache["group"]).pow(2).mean()}

    result = fit(run=RunDir(folder), config=config, stage_config=config, modules={"model": model},
                 optimizer=optimizer, batches_per_epoch=6, train_step=step, evaluate=lambda epoch: {"t": {"mAP": 1.0}},
                 before_epoch=lambda epoch: cache.update(group=None), resumables={"cache": cache}, resume=resume,
                 log=logging.getLogger("kdreid.test"))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), result.epochs[0]["losses"]


def _stopped_then_resumed(stop_before: int, folder: str) -> tuple:
    from kdreid.stages import loop

    whole = _fit_with_a_cached_group(Path(folder) / "whole")
    hold_step, hold = loop._test_hold_step, loop._hold
    loop._test_hold_step = lambda: stop_before
    loop._hold = lambda step, stop: setattr(stop, "signal", 15)  # SIGTERM, as torchrun forwards it to every process
    try:
        _fit_with_a_cached_group(Path(folder) / "stopped")
        raise AssertionError("not stopped")
    except loop.TrainingInterrupted:
        pass
    finally:
        loop._test_hold_step, loop._hold = hold_step, hold
    distributed.barrier()  # the main process has written the checkpoint
    return whole, _fit_with_a_cached_group(Path(folder) / "stopped", resume=True)


@pytest.mark.parametrize("stop_before", [2, 3], ids=["between-groups", "inside-a-group"])
def test_a_run_stopped_inside_an_epoch_resumes_each_process_where_it_stood(tmp_path, stop_before):
    # The checkpoint written at a signal held the main process's loss sums and its cached group of batches (its
    # share of the images), which every process resumed from: the resumed epoch's logged mean counted the main
    # process's share twice, and the other processes trained on the main one's images to the end of the group.
    for (weights, losses), (resumed_weights, resumed_losses) in _on_processes(
            functools.partial(_stopped_then_resumed, stop_before), tmp_path):
        assert resumed_losses["loss"] == pytest.approx(losses["loss"], rel=1e-12)
        assert torch.equal(resumed_weights, weights)
