"""The fast-path pieces of the training loop on the CPU: losses read from the device once per window (with the
NaN check naming the step and term), torch.compile with its eager fallback, and channels_last batches."""

import logging

import pytest
import torch
from torch import nn

from kdreid.data.augment import AugmentConfig, augment_batch
from kdreid.rundir import RunDir
from kdreid.stages.loop import TrainConfig, fit
from kdreid.stages.optim import OptimConfig, build_optimizer
from kdreid.stages.speed import (
    CompiledStep, LossWindow, auto_compile_mode, host_to_device, resolve_compile, tune_backends,
    use_channels_last,
)
from kdreid.errors import ConfigError, DatasetError, TrainingError

DATA = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
TARGETS = DATA @ torch.arange(6, dtype=torch.float32)


def test_loss_window_means_and_first_bad_step():
    window = LossWindow(epoch=2)
    for i, value in enumerate([1.0, 2.0, 3.0]):
        window.add(i, {"loss": torch.tensor(value), "ce": torch.tensor(value / 2)})
    assert window.pending and not window.sums  # nothing read back before the flush
    window.flush()
    window.add(3, {"loss": torch.tensor(4.0), "ce": torch.tensor(2.0)})
    assert window.means() == {"loss": 2.5, "ce": 1.25}
    window.add(4, {"loss": torch.tensor(1.0), "ce": torch.tensor(1.0)})
    window.add(5, {"loss": torch.tensor(float("inf")), "ce": torch.tensor(float("nan"))})
    window.add(6, {"loss": torch.tensor(float("nan")), "ce": torch.tensor(1.0)})
    with pytest.raises(TrainingError, match=r"epoch 3, iteration 6: loss=inf, ce=nan;"):
        window.flush()


def squared_error(prediction, target):
    return (prediction - target).pow(2).mean()


class _Draws:
    """A stateful batch source, as a stage's sampler is: every step takes the next position."""

    def __init__(self):
        self.position = 0

    def take(self) -> int:
        self.position += 1
        return self.position - 1

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def _fit(tmp_path, name, compile="off", log_freq=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
    config = TrainConfig(epochs=2, device="cpu", compile=compile, log_freq=log_freq,
                         optim=OptimConfig(optimizer="adam", lr=0.01, warmup_epochs=0))
    optimizer = build_optimizer(model.parameters(), config.optim)

    draws = _Draws()

    def step(ctx):
        index = (torch.randint(0, 64, (8,), generator=ctx.generator) + 8 * draws.take()) % 64
        # From the second epoch the loss goes through the stage's compile, as D-MMD does from --dmmd-start.
        loss_fn = ctx.compile_loss(squared_error) if ctx.epoch >= 1 else squared_error
        loss = loss_fn(model(DATA[index]).squeeze(1), TARGETS[index])
        return {"loss": loss, "mse": loss}

    evaluated_eagerly = []

    def evaluate(epoch):
        evaluated_eagerly.append(torch.compiler.is_compiling())
        with torch.no_grad():
            return {"t": {"mAP": float(model(DATA[:7]).mean())}}  # another batch size than training's

    run = RunDir(tmp_path / name)
    result = fit(run=run, config=config, stage_config=config, modules={"model": model}, optimizer=optimizer,
                 batches_per_epoch=7, train_step=step, evaluate=evaluate, resumables={"draws": draws})
    return model, result, (tmp_path / name / "log.txt").read_text()


def _eager_backend(monkeypatch, compiled=None):
    # The real dynamo path (nn.Module.compile, guards, set_stance) without inductor's C++ build (minutes on 2 cores).
    # `compiled`, a list, collects (fn, mode) of every call.
    original = torch.compile

    def eager_compile(fn, **kwargs):
        if compiled is not None:
            compiled.append((fn, kwargs.get("mode")))
        return original(fn, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    return original


def _failing_compilation(message):
    """What torch.compile gives when compilation fails: a callable that raises at its first call."""
    def call(*args, **kwargs):
        raise RuntimeError(message)
    return call


def test_loss_means_do_not_depend_on_the_window(tmp_path):
    _, every_step, _ = _fit(tmp_path, "a", log_freq=1)
    _, windowed, _ = _fit(tmp_path, "b", log_freq=5)
    assert every_step.epochs[1]["losses"] == pytest.approx(windowed.epochs[1]["losses"])


def test_compiled_training_matches_eager_and_leaves_a_plain_module(tmp_path, monkeypatch):
    eager, eager_result, _ = _fit(tmp_path, "eager")
    _eager_backend(monkeypatch)
    compiled, compiled_result, log = _fit(tmp_path, "compiled", compile="default")
    assert "torch.compile (default)" in log and "failed" not in log
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(a, b)
    assert compiled_result.epochs[1]["losses"] == pytest.approx(eager_result.epochs[1]["losses"])
    assert compiled._compiled_call_impl is None  # evaluation and export after training see the eager module


def test_compile_failure_falls_back_to_eager_and_says_why(tmp_path, monkeypatch):
    eager, _, _ = _fit(tmp_path, "eager")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: _failing_compilation("inductor needs a C++ compiler"))
    fallen, _, log = _fit(tmp_path, "fallen", compile="default")
    assert "torch.compile (default) failed (RuntimeError: inductor needs a C++ compiler); training eagerly" in log
    for a, b in zip(eager.parameters(), fallen.parameters()):
        torch.testing.assert_close(a, b)  # the failed first step left no trace (its batch drawn again): as eager


def test_a_stage_loss_compiles_with_the_step_and_its_late_failure_falls_back(tmp_path, monkeypatch):
    eager, eager_result, _ = _fit(tmp_path, "eager")
    compiled_fns = []
    original = _eager_backend(monkeypatch, compiled_fns)
    compiled, compiled_result, log = _fit(tmp_path, "compiled", compile="default")
    assert (squared_error, "default") in compiled_fns and "failed" not in log
    assert compiled_result.epochs[1]["losses"] == pytest.approx(eager_result.epochs[1]["losses"])

    # The loss first runs in the second epoch, after the guarded first step: its own first call is guarded.
    def loss_breaks(fn, **kwargs):
        if fn is squared_error:
            return _failing_compilation("no Triton for this loss")
        return original(fn, backend="eager")

    monkeypatch.setattr(torch, "compile", loss_breaks)
    fallen, _, log = _fit(tmp_path, "fallen", compile="default")
    assert "torch.compile (default) failed (RuntimeError: no Triton for this loss); training eagerly" in log
    for a, b in zip(eager.parameters(), fallen.parameters()):
        torch.testing.assert_close(a, b)
    assert fallen._compiled_call_impl is None


def test_cuda_graph_mode_needs_a_gpu(caplog):
    model = nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING):
        compiled = CompiledStep(model, "reduce-overhead", torch.device("cpu"), logging.getLogger("t"))
    assert compiled.mode == "default" and "need a GPU" in caplog.text
    compiled.release()
    assert model._compiled_call_impl is None


def test_compile_auto_is_cuda_graphs_for_osnet_on_one_gpu_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects only: nothing runs on them
    assert auto_compile_mode("osnet_x0_25") == "reduce-overhead" and auto_compile_mode("resnet50") == "off"
    assert resolve_compile("auto", cuda, auto_compile_mode("osnet_x0_25")) == "reduce-overhead"
    assert resolve_compile("auto", cuda, auto_compile_mode("resnet50")) == "off"
    assert resolve_compile("auto", cpu, "reduce-overhead") == "off"  # compiling for a CPU takes minutes
    assert resolve_compile("auto", cuda, "reduce-overhead", distributed=True) == "off"
    assert resolve_compile("auto", cuda) == "off"  # stages other than the source stage
    assert resolve_compile("default", cpu) == "default"  # an explicit mode is always obeyed


def test_a_batch_index_goes_to_the_gpu_through_pinned_memory(monkeypatch):
    # From pageable memory CUDA synchronises the stream before the copy: the host would wait for the GPU each
    # step. Nothing runs on a GPU here; the test records the calls.
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: calls.append((args, kwargs)) or self)
    host_to_device(torch.arange(3), torch.device("cuda"))
    assert calls == ["pin", ((torch.device("cuda"),), {"non_blocking": True})]
    calls.clear()
    host_to_device(torch.arange(3), torch.device("cpu"))
    assert calls == [((torch.device("cpu"),), {})]  # no pinning without a GPU


def test_unknown_compile_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="--compile 'fast'"):
        TrainConfig(compile="fast").validate()


def test_channels_last_batches_hold_the_same_values():
    images = torch.randint(0, 256, (6, 3, 16, 8), dtype=torch.uint8)
    config = AugmentConfig()
    plain = augment_batch(images, config, torch.Generator().manual_seed(3))
    nhwc = augment_batch(images, config, torch.Generator().manual_seed(3), memory_format=torch.channels_last)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and plain.is_contiguous()
    assert torch.equal(plain, nhwc)


def test_a_loss_term_of_some_steps_only_is_averaged_over_those_steps():
    # D-MMD terms join from --dmmd-start, inside an epoch's window: each term's mean is over the steps that had it.
    window = LossWindow(epoch=0)
    window.add(0, {"loss": torch.tensor(1.0)})
    window.add(1, {"loss": torch.tensor(3.0), "dmmd": torch.tensor(4.0)})
    window.add(2, {"loss": torch.tensor(5.0), "dmmd": torch.tensor(2.0)})
    assert window.means() == {"loss": 3.0, "dmmd": 3.0}


def test_cudnn_autotuning_stays_off_in_deterministic_mode(monkeypatch):
    # Device objects only: nothing runs on a GPU.
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    tune_backends(torch.device("cuda"), deterministic=True)
    tune_backends(torch.device("cpu"), deterministic=False)
    assert torch.backends.cudnn.benchmark is False
    tune_backends(torch.device("cuda"), deterministic=False)
    assert torch.backends.cudnn.benchmark is True


def test_a_user_error_in_the_first_compiled_step_is_not_taken_for_a_compiler_failure(caplog):
    # A bad input (or a NaN) raised by the guarded first step is reported as itself: no "torch.compile failed",
    # no eager repeat of the step, and the compiled forward stays.
    model = nn.Linear(6, 1)
    compiled = CompiledStep(model, "default", torch.device("cpu"), logging.getLogger("t"))
    rewound = []

    def step():
        raise DatasetError("a batch of P=4 tracklets needs at least that many")

    with caplog.at_level(logging.WARNING), pytest.raises(DatasetError, match="a batch of P=4"):
        compiled.run(step, rewind=lambda: rewound.append(1))
    assert compiled.active and not rewound and "failed" not in caplog.text
    compiled.release()


@pytest.mark.parametrize("set_stance", [True, False], ids=["set_stance", "torch-before-2.6"])
def test_evaluation_bypasses_the_compiled_forward(monkeypatch, set_stance):
    # Evaluation batches vary in size: under `eager()` the forward runs as Python, never traced or recompiled;
    # also on torch < 2.6 (pyproject allows 2.4), which has no torch.compiler.set_stance.
    _eager_backend(monkeypatch)
    if not set_stance:
        monkeypatch.delattr(torch.compiler, "set_stance", raising=False)
    elif not hasattr(torch.compiler, "set_stance"):
        pytest.skip(f"torch {torch.__version__} has no torch.compiler.set_stance")
    traced = []

    class Recording(nn.Linear):
        def forward(self, x):
            traced.append(torch.compiler.is_compiling())
            return super().forward(x)

    model = Recording(6, 1)
    compiled = CompiledStep(model, "default", torch.device("cpu"), logging.getLogger("t"))
    try:
        model(DATA[:8])
        assert traced == [True]  # the training forward goes through dynamo
        with compiled.eager():
            expected = DATA[:7] @ model.weight.T + model.bias
            torch.testing.assert_close(model(DATA[:7]), expected)
        assert traced == [True, False]
        model(DATA[:8])
        assert traced == [True, False, True]  # and the compiled forward is back after it
    finally:
        compiled.release()


def test_the_cpu_keeps_the_contiguous_layout():
    # channels_last is a CUDA speed-up; on the CPU the training step stays the computation CI checks.
    assert use_channels_last(torch.device("cuda")) and not use_channels_last(torch.device("cpu"))
