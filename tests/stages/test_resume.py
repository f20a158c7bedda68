"""Exact resume: a run killed with SIGKILL (twice, mid-epoch) or stopped by SIGTERM, then resumed, ends with the
same weights and metrics.json (every field but timings) as an uninterrupted run; damaged checkpoints are skipped.

The subprocess test holds the run at a known step with the loop's test-only hook (KDREID_TEST_HOLD_AT_STEP: print
a marker, wait for a signal) so that kills land at known points without sleeping and guessing."""

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

from kdreid.cli import main
from kdreid.data.samplers import PKSampler
from kdreid.errors import CheckpointError, DatasetError
from kdreid.models import load_checkpoint
from kdreid.rundir import RunDir
from kdreid.stages import loop
from kdreid.stages.data import combine_train, load_datasets
from kdreid.stages.loop import TrainConfig, TrainingInterrupted, fit, load_training_state, save_training_state
from kdreid.stages.optim import OptimConfig, build_optimizer

HOLD = "KDREID_TEST_HOLD_AT_STEP"


def _same_run(a, b):
    """model.pt weights bit-identical, metrics.json equal but for the epochs' timings."""
    first, second = load_checkpoint(a / "model.pt").state_dict(), load_checkpoint(b / "model.pt").state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    metrics = []
    for folder in (a, b):
        data = json.loads((folder / "metrics.json").read_text())
        for epoch in data["epochs"]:
            epoch.pop("seconds")
        metrics.append(data)
    assert metrics[0] == metrics[1]


# ------------------------------------------------------------------------------------------------ SIGKILL, SIGTERM
def _source_args(root, out):
    return ["train-source", "-s", "synth_msmt", "-a", "resnet_tiny", "--root", str(root), "--out", str(out),
            "--epochs", "3", "--batch-size", "32", "--num-instances", "4", "--height", "32", "--width", "16",
            "--device", "cpu", "--seed", "0", "--deterministic"]


def _start(args, hold=None):
    env = {k: v for k, v in os.environ.items() if k != HOLD}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # the same intra-op threads in every process
    if hold is not None:
        env[HOLD] = str(hold)
    return subprocess.Popen([sys.executable, "-m", "kdreid.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _hold_then(process, signum) -> str:
    """Wait for the hook's marker, send `signum`, wait for the end; -> everything the process wrote to stderr."""
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("kdreid-test: holding"):
            process.send_signal(signum)
            break
    lines += process.stderr.read()
    process.wait(timeout=120)
    text = "".join(lines)
    assert "kdreid-test: holding" in text, text
    return text


def test_killed_twice_and_stopped_once_then_resumed_is_bit_identical(synth_root, tmp_path):
    records = combine_train(load_datasets(["synth_msmt"], str(synth_root)))
    steps = len(PKSampler([r.pid for r in records], 32, 4))  # per epoch
    assert steps >= 8
    straight = _start(_source_args(synth_root, tmp_path / "straight"))  # runs alongside the interrupted chain

    broken = tmp_path / "broken"
    args = _source_args(synth_root, broken)
    # 1. SIGKILL inside epoch 2: only the end-of-epoch-1 checkpoint exists.
    first = _start(args, hold=steps + 3)
    _hold_then(first, signal.SIGKILL)
    assert first.returncode == -signal.SIGKILL
    assert load_training_state(broken / "checkpoints" / "last.pt")["epoch"] == 1
    # 2. Resumed, stopped by SIGTERM inside epoch 3: a checkpoint at that exact position, a hint, exit 143.
    second = _start([*args, "--resume"], hold=2 * steps + 2)
    text = _hold_then(second, signal.SIGTERM)
    assert second.returncode == 128 + signal.SIGTERM, text
    assert f"stopped by SIGTERM at epoch 3, iteration 3 of {steps}" in text and "with --resume" in text
    state = load_training_state(broken / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and state["inside"]["iteration"] == 2
    assert load_training_state(broken / "checkpoints" / "previous.pt")["epoch"] == 2
    # 3. Resumed from inside epoch 3, killed again later in it: the mid-epoch checkpoint is what is left.
    third = _start([*args, "--resume"], hold=2 * steps + 6)
    _hold_then(third, signal.SIGKILL)
    assert third.returncode == -signal.SIGKILL
    # 4. Resumed to the end.
    last = subprocess.run([sys.executable, "-m", "kdreid.cli", *args, "--resume"], capture_output=True, text=True,
                          env={**{k: v for k, v in os.environ.items() if k != HOLD}, "OMP_NUM_THREADS": "1",
                               "MKL_NUM_THREADS": "1"}, timeout=300)
    assert last.returncode == 0, last.stderr
    assert "continuing at epoch 3, iteration 3" in last.stderr
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    _same_run(tmp_path / "straight", broken)


# ------------------------------------------------------------------------------------------------ in process
@pytest.fixture
def sigterm_at(monkeypatch):
    """Make the loop receive SIGTERM just before global step N (the hook, with the signal sent in-process)."""

    def arm(step: int) -> None:
        monkeypatch.setenv(HOLD, str(step))
        monkeypatch.setattr(loop, "_hold", lambda step, stop: signal.raise_signal(signal.SIGTERM))

    return arm


def test_adapt_with_pseudo_labels_resumes_exactly_from_inside_an_epoch(source_model, synth_root, tmp_path,
                                                                       sigterm_at, capsys):
    # The pseudo-labels of epoch 2 come from the weights at its start: resuming inside it must reuse them (the
    # weights have moved since), and the target sampler must continue where it was.
    handler = signal.getsignal(signal.SIGTERM)
    args = ["adapt", "-s", "synth_msmt", "-t", "synth_duke", "--init", str(source_model), "--root",
            str(synth_root), "--grouping", "pseudo", "--epochs", "2", "--batch-size", "16", "--num-instances", "4",
            "--height", "32", "--width", "16", "--device", "cpu", "--seed", "0"]
    config = ["--config", str(tmp_path / "pseudo.yaml")]
    (tmp_path / "pseudo.yaml").write_text("pseudo: {eps: 0.3, min_samples: 2}\n")
    assert main([*args, *config, "--out", str(tmp_path / "straight")]) == 0
    steps = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert len(steps["epochs"]) == 2
    records = combine_train(load_datasets(["synth_msmt"], str(synth_root)))
    per_epoch = len(PKSampler([r.pid for r in records], 16, 4))
    sigterm_at(per_epoch + 2)
    assert main([*args, *config, "--out", str(tmp_path / "broken")]) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at epoch 2, iteration 3" in capsys.readouterr().err
    os.environ.pop(HOLD)
    assert main([*args, *config, "--out", str(tmp_path / "broken"), "--resume"]) == 0
    _same_run(tmp_path / "straight", tmp_path / "broken")
    assert signal.getsignal(signal.SIGTERM) is handler  # the loop put the previous handler back


def test_adapt_keeps_its_warm_up_pseudo_labels_across_a_resume(source_model, synth_root, tmp_path, monkeypatch):
    # Before --dmmd-start no loss reads the target's groups: the first epoch's clustering serves the whole warm-up
    # (one a warm-up epoch took minutes each at Market size), and a run resumed inside the warm-up batches the
    # target with those labels, as the uninterrupted run did, where clustering again would group it otherwise.
    from kdreid.stages import adapt

    clustered = []
    real = adapt.dbscan
    monkeypatch.setattr(adapt, "dbscan", lambda distances, eps, least: clustered.append(eps) or real(
        distances, eps, least))
    settings = tmp_path / "settings.yaml"
    settings.write_text("pseudo: {eps: 0.3, min_samples: 2}\ntrain: {optim: {warmup_epochs: 0, scheduler: constant}}\n")
    args = ["adapt", "-s", "synth_msmt", "-t", "synth_duke", "--init", str(source_model), "--root", str(synth_root),
            "--grouping", "pseudo", "--dmmd-start", "2", "--batch-size", "16", "--num-instances", "4", "--height",
            "32", "--width", "16", "--device", "cpu", "--seed", "0", "--eval-freq", "1", "--config", str(settings)]
    assert main([*args, "--epochs", "3", "--out", str(tmp_path / "straight")]) == 0
    assert len(clustered) == 2  # for the warm-up (epochs 1-2), then for epoch 3, where D-MMD starts
    assert main([*args, "--epochs", "1", "--out", str(tmp_path / "broken")]) == 0
    assert main([*args, "--epochs", "3", "--out", str(tmp_path / "broken"), "--resume"]) == 0
    assert len(clustered) == 4
    _same_run(tmp_path / "straight", tmp_path / "broken")


def test_distill_resumes_exactly_from_inside_a_group_of_targets(three_domains, tmp_path, sigterm_at, capsys):
    # target_alt batch: the first step of each group draws every target's batch and fixes the order; a stop at
    # the group's second step must carry those batches over.
    from kdreid.models import build_model, save_checkpoint

    torch.manual_seed(0)
    num_classes = 1 + max(r.pid for r in combine_train(load_datasets(["synth_msmt"], str(three_domains))))
    paths = [str(save_checkpoint(tmp_path / f"{name}.pt", build_model("osnet_tiny", classes)))
             for name, classes in (("student", num_classes), ("t1", 7), ("t2", 5))]
    args = ["distill", "-s", "synth_msmt", "-t", "synth_duke", "synth_cuhk", "--teachers", paths[1], paths[2],
            "--student-init", paths[0], "--root", str(three_domains), "--epochs", "1", "--batch-size", "16",
            "--num-instances", "4", "--height", "32", "--width", "16", "--device", "cpu", "--seed", "0",
            "--lda-weight", "0.5"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    sigterm_at(3)  # group 1, second target
    assert main([*args, "--out", str(tmp_path / "broken")]) == 128 + signal.SIGTERM
    state = load_training_state(tmp_path / "broken" / "checkpoints" / "last.pt")
    assert state["inside"]["iteration"] == 3 and state["inside"]["resumables"]["order_and_group"]["group"]
    os.environ.pop(HOLD)
    assert main([*args, "--out", str(tmp_path / "broken"), "--resume"]) == 0
    _same_run(tmp_path / "straight", tmp_path / "broken")


# ------------------------------------------------------------------------------------------------ damaged files
DATA = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
TARGETS = DATA @ torch.arange(6, dtype=torch.float32)


def _train(folder, *, resume=False, interrupt_at=None, evaluate=None, eval_freq=0):
    torch.manual_seed(0)
    model = nn.Linear(6, 1)
    config = TrainConfig(epochs=4, device="cpu", eval_freq=eval_freq,
                         optim=OptimConfig(optimizer="adam", lr=0.01, warmup_epochs=1))
    optimizer = build_optimizer(model.parameters(), config.optim)

    def step(context):
        if interrupt_at == (context.epoch, context.iteration):
            raise KeyboardInterrupt  # a crash: no checkpoint for this epoch
        index = torch.randint(0, 64, (8,), generator=context.generator)
        loss = (model(DATA[index]).squeeze(1) - TARGETS[index]).pow(2).mean()
        return {"loss": loss}

    evaluate = evaluate or (lambda epoch: {"t": {"mAP": 1.0}})
    fit(run=RunDir(folder), config=config, stage_config=config, modules={"model": model}, optimizer=optimizer,
        batches_per_epoch=5, train_step=step, evaluate=evaluate, resume=resume)
    return model


@pytest.mark.parametrize("failing_epoch", [2, 4])
def test_a_failed_evaluation_keeps_its_epoch_and_resume_evaluates_it_again(tmp_path, failing_epoch):
    # An image of a target's gallery that does not decode stopped the run after the epoch had trained: that
    # epoch was lost (and with --epochs 1 the whole run folder).
    def evaluate(epoch):
        if epoch + 1 == failing_epoch and not fixed:
            raise DatasetError("image g.jpg cannot be decoded (truncated); replace it")
        return {"t": {"mAP": float(epoch)}}

    fixed = True
    reference = _train(tmp_path / "straight", evaluate=evaluate, eval_freq=2)
    fixed = False
    with pytest.raises(DatasetError, match=rf"cannot be decoded \(truncated\); replace it \(evaluating epoch "
                                           rf"{failing_epoch}, whose training is saved in .*last\.pt: fix that and "
                                           r"--resume, which evaluates it again\)"):
        _train(tmp_path / "run", evaluate=evaluate, eval_freq=2)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_training_state(last)
    assert state["epoch"] == failing_epoch and state["evaluation_pending"]
    assert "metrics" not in state["history"][-1]
    fixed = True
    resumed = _train(tmp_path / "run", evaluate=evaluate, eval_freq=2, resume=True)
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    state = load_training_state(last)
    assert state["epoch"] == 4 and "evaluation_pending" not in state
    assert [e.get("metrics") for e in state["history"]] == [None, {"t": {"mAP": 1.0}}, None, {"t": {"mAP": 3.0}}]


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "empty"])
def test_a_damaged_last_checkpoint_is_skipped_for_the_previous_one(tmp_path, damage, capsys):
    reference = _train(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "run", interrupt_at=(3, 1))  # last.pt = epoch 3, previous.pt = epoch 2
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    data = bytearray(last.read_bytes())
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    elif damage == "flip a byte":
        data[len(data) // 2] ^= 0xFF
    else:
        data = b""
    last.write_bytes(bytes(data))
    resumed = _train(tmp_path / "run", resume=True)
    err = capsys.readouterr().err
    assert f"warning: {last}: " in err and f"resumed from {last.with_name('previous.pt')}" in err
    assert last.with_name("last.pt.damaged").is_file()
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_both_checkpoints_damaged_is_one_error_naming_them(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "run", interrupt_at=(3, 1))
    for name in ("last.pt", "previous.pt"):
        path = tmp_path / "run" / "checkpoints" / name
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"no complete checkpoint to resume from .*last\.pt: truncated"):
        _train(tmp_path / "run", resume=True)


def test_checkpoint_header_records_length_and_sha256(tmp_path):
    path = tmp_path / "state.pt"
    save_training_state(path, {"epoch": 1, "modules": {}, "optimizer": {}, "rng": {}})
    header, payload = path.read_bytes().split(b"\n", 1)
    digest = hashlib.sha256(payload).hexdigest()
    assert header.decode() == f"KDREID-TRAINING-STATE 1 sha256={digest} bytes={len(payload)}"
    assert load_training_state(path)["epoch"] == 1
    save_training_state(path, {"epoch": 2, "modules": {}, "optimizer": {}, "rng": {}})
    assert load_training_state(tmp_path / "previous.pt")["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous.pt", "state.pt"]  # no temporary files left


def test_sigint_before_the_first_step_of_an_epoch_resumes_there_and_handlers_come_back(tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setenv(HOLD, "5")  # the first step of epoch 2: the signal arrives before it
    monkeypatch.setattr(loop, "_hold", lambda step, stop: signal.raise_signal(signal.SIGINT))
    with pytest.raises(TrainingInterrupted, match="stopped by SIGINT at epoch 2, iteration 1 of 5") as caught:
        _train(tmp_path / "run")
    assert caught.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before
    state = load_training_state(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and state["inside"]["iteration"] == 0
    monkeypatch.delenv(HOLD)
    resumed = _train(tmp_path / "run", resume=True)
    reference = _train(tmp_path / "straight")
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_sigint_the_process_was_started_ignoring_stays_ignored(tmp_path, monkeypatch):
    # A script's `kdreid ... &` inherits SIGINT ignored, so that Ctrl-C stops the script and not its background jobs;
    # Python leaves it so, and training must not take it over (it did: the job checkpointed and stopped).
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the autouse fixture restores the one before the test
    monkeypatch.setenv(HOLD, "5")
    raised = []
    monkeypatch.setattr(loop, "_hold", lambda step, stop: raised.append(step) or signal.raise_signal(signal.SIGINT))
    _train(tmp_path / "run")
    assert raised and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert load_training_state(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 4  # trained to its end


def test_sigint_during_the_last_evaluation_stops_after_its_checkpoint_and_resume_only_finishes(tmp_path):
    """Ctrl-C while the last epoch is evaluated: the stage must not write its model and exit 0 (a pipeline would
    go on to the next stages); the checkpoint holds the finished epoch, and --resume trains and evaluates nothing."""
    evaluated = []

    def evaluate_then_interrupt(epoch):
        evaluated.append(epoch)
        if epoch == 3:
            signal.raise_signal(signal.SIGINT)
        return {"t": {"mAP": 1.0}}

    with pytest.raises(TrainingInterrupted, match="after epoch 4, the last") as caught:
        _train(tmp_path / "run", evaluate=evaluate_then_interrupt)
    assert caught.value.exit_code == 130
    assert load_training_state(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 4
    resumed = _train(tmp_path / "run", resume=True, evaluate=evaluate_then_interrupt)
    assert evaluated == [3]
    for a, b in zip(_train(tmp_path / "straight").parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_resumed_plain_dict_states_come_back_on_the_training_device():
    """Checkpoints load onto the CPU; distillation's cached group of batches must reach the device its steps run on
    (on CUDA a resumed group failed with a device mismatch). The meta device stands in for a GPU here."""
    group = {"group": None}
    saved = {"group": {"group": {"source": (torch.zeros(2, 3), torch.tensor([1, 2])),
                                 "targets": [(torch.ones(2, 3), torch.tensor([0, 0]))], "order": [0]}}}
    loop._load_resumables({"group": group}, saved, torch.device("meta"))
    restored = group["group"]
    tensors = [*restored["source"], *restored["targets"][0]]
    assert all(tensor.device.type == "meta" for tensor in tensors)
    assert isinstance(restored["source"], tuple) and restored["order"] == [0]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_before_training_begins_leaves_no_run_folder(synth_root, tmp_path, monkeypatch, capsys, signum,
                                                              code):
    """Found by a review: Ctrl-C or SIGTERM while the datasets were read left config.yaml, log.txt and
    datasets.json (SIGTERM killed the process with no clean-up): a folder that --resume could not continue and
    that the same command then refused as occupied."""
    from kdreid.stages import common

    def interrupted(*args, **kwargs):
        signal.raise_signal(signum)  # the real handler: SIGTERM's is installed only while a command runs

    monkeypatch.setattr(common, "load_datasets", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "new" / "run"
    assert main(_source_args(synth_root, out)) == code
    assert capsys.readouterr().err.endswith("kdreid: interrupted\n")
    assert not (tmp_path / "new").exists()
    assert signal.getsignal(signal.SIGTERM) is before
    monkeypatch.undo()
    assert main(_source_args(synth_root, out)) == 0  # the same command starts afresh, not refused as occupied


def test_a_sigterm_handler_of_the_program_running_kdreid_is_left_in_place():
    """`sigterm_interrupts` takes SIGTERM only when nothing else handles it (a review: taking it always, and
    handing back SIG_DFL after, passed every test)."""
    from kdreid.errors import Terminated
    from kdreid.errors import sigterm_interrupts

    def own(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, own)
    try:
        with sigterm_interrupts():
            assert signal.getsignal(signal.SIGTERM) is own
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, before)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(Terminated):
            with sigterm_interrupts():
                signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigterm_interrupts_outside_the_main_thread_leaves_sigterm_alone():
    """A program that runs kdreid in a worker thread: Python lets only the main thread set signal handlers."""
    import threading

    from kdreid.errors import sigterm_interrupts

    before, seen = signal.getsignal(signal.SIGTERM), []

    def work():
        try:
            with sigterm_interrupts():
                seen.append(signal.getsignal(signal.SIGTERM))
        except Exception as error:  # noqa: BLE001 - reported below, in the main thread
            seen.append(error)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [before] and signal.getsignal(signal.SIGTERM) is before


def test_the_python_rng_state_comes_back_with_its_cached_gauss_value():
    """Found by a review: the checkpoint dropped the value random.gauss keeps between two calls (it draws them in
    pairs), so after a resume the next random.gauss differed from an uninterrupted run's whenever the number of
    draws so far was odd."""
    import random

    random.seed(0)
    random.gauss(0, 1)  # the second value of the pair is kept for the next call
    state = torch.load(_saved(loop._capture_rng()), weights_only=True)  # through a checkpoint's serialisation
    expected = [random.gauss(0, 1), random.random()]
    random.seed(1)
    loop._restore_rng(state)
    assert [random.gauss(0, 1), random.random()] == expected


def _saved(value):
    import io

    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return buffer


def test_a_resume_reads_its_checkpoint_once(synth_root, tmp_path, sigterm_at, monkeypatch):
    """Found by a review: a resume read, checked and unpickled last.pt twice (its recorded settings, then its
    state), hundreds of MB for a large model; and kept the loaded copy for the whole of training."""
    args = [*_source_args(synth_root, tmp_path / "run"), "--epochs", "1"]
    sigterm_at(2)
    assert main(args) == 128 + signal.SIGTERM
    monkeypatch.delenv(HOLD)
    unpickled = []
    real = loop.safe_load
    monkeypatch.setattr(loop, "safe_load", lambda source, where: unpickled.append(where) or real(source, where))
    assert main([*args, "--resume"]) == 0
    assert unpickled == [str(tmp_path / "run" / "checkpoints" / "last.pt")]
