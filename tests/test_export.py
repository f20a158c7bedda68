"""`kdreid export`: ONNX / TorchScript files reproduce PyTorch's features and carry the input contract; a torchreid
state dict loads into torchreid's own OSNet; refusals leave no file behind."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch
from torch import nn

from kdreid import export as export_module
from kdreid.cli import main
from kdreid.errors import ModelError
from kdreid.export import FORMATS, SUFFIXES, export_model, read_metadata
from kdreid.models import build_model, convert_dsbn, save_checkpoint
from kdreid.models.heads import IMAGENET_MEAN, IMAGENET_STD
from tests.reference import randomise_batchnorm

pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime: pip install 'kdreid[export]'")
import onnxruntime  # noqa: E402

SIZE = (64, 32)


def tiny(arch: str = "osnet_tiny", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(arch, 5, **kwargs)
    randomise_batchnorm(model)
    model.eval()
    model.kdreid_meta = {"extra": {"input_size": list(SIZE)}}  # what a checkpoint trained at 64x32 records
    return model


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


def expected(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def run_torchscript(path, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return export_module._jit_load(path)(x).numpy()


def run_onnx(path, x: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x.numpy()})[0]


@pytest.mark.parametrize("arch", ["osnet_tiny", "resnet_tiny"])
def test_onnx_dynamic_batch_matches_pytorch_and_records_the_contract(arch, tmp_path):
    model = tiny(arch)
    out = tmp_path / "model.onnx"
    result = export_model(model, out, "onnx", dynamic_batch=True, images=images(4))
    assert result.max_abs_diff <= 1e-4
    # Checked here again, independently of the command's own check, on new images and other batch sizes.
    for n in (1, 3, 7):
        x = images(n, seed=10 + n)
        got, want = run_onnx(out, x), expected(model, x)
        assert got.shape == want.shape == (n, model.embedding_dim)
        assert want.std() > 1e-3
        assert np.abs(got - want).max() <= 1e-4
    meta = read_metadata(out)
    assert meta["input_height"] == "64" and meta["input_width"] == "32" and meta["batch"] == "dynamic"
    assert meta["input_shape"] == "[N, 3, 64, 32]" and meta["arch"] == arch
    assert "[0, 1]" in meta["input_format"] and "inside the model" in meta["normalization"]
    assert float(meta["checked_max_abs_diff"]) <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temp file left


def test_onnx_static_batch_takes_one_image(tmp_path):
    model = tiny()
    out = export_model(model, tmp_path / "m.onnx", "onnx", images=images(3)).path
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 64, 32]
    assert read_metadata(out)["batch"] == "1"
    with pytest.raises(Exception):  # the batch size is baked in
        session.run(None, {"images": images(2).numpy()})


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_fp16_export_is_half_precision_and_within_tolerance(format, tmp_path):
    model = tiny()
    out = tmp_path / f"m16.{format}"
    result = export_model(model, out, format, dynamic_batch=True, fp16=True, images=images(4))
    x = images(5, seed=3)
    if format == "onnx":
        import onnx

        graph = onnx.load(str(out)).graph
        weight_types = {init.data_type for init in graph.initializer if len(init.dims) == 4}
        assert weight_types == {onnx.TensorProto.FLOAT16}  # conv weights really are half
        got = run_onnx(out, x)
    else:
        got = run_torchscript(out, x)
    want = expected(model, x)
    relative = (np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)).max()
    assert 0 < relative <= 1e-2  # rounded (so half precision ran), yet within the fp16 tolerance
    assert result.tolerance == 1e-2 and 0 < result.relative_error <= 1e-2
    assert float(read_metadata(out)["checked_relative_error"]) == pytest.approx(result.relative_error, rel=0.01)
    assert read_metadata(out)["precision"].startswith("float16")


def test_torchscript_round_trip_with_metadata(tmp_path):
    model = tiny()
    out = tmp_path / "m.ts"
    export_model(model, out, "torchscript", dynamic_batch=True, images=images(2))
    for n in (1, 6):
        x = images(n, seed=20 + n)
        assert np.abs(run_torchscript(out, x) - expected(model, x)).max() <= 1e-4
    meta = read_metadata(out)
    assert meta["input_height"] == "64" and meta["embedding_dim"] == str(model.embedding_dim)


def test_dsbn_model_exports_its_default_domain(tmp_path):
    model = convert_dsbn(tiny(), 2)
    randomise_batchnorm(model, seed=5)  # the two domains' BNs now differ
    model.default_domain = 1
    x = images(3)
    with torch.no_grad():
        domain1, domain0 = model(x, domain=1).numpy(), model(x, domain=0).numpy()
    assert np.abs(domain1 - domain0).max() > 1e-3
    out = export_model(model, tmp_path / "d.ts", "torchscript", dynamic_batch=True, images=x).path
    assert np.abs(run_torchscript(out, x) - domain1).max() <= 1e-4


# ------------------------------------------------------------------------------------------------ torchreid
@pytest.fixture(scope="module")
def torchreid_osnet():
    from tests.reference import load_torchreid_module

    return load_torchreid_module("torchreid/reid/models/osnet.py")


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("arch", ["osnet_x0_25", "osnet_tiny"])
def test_torchreid_state_dict_loads_into_torchreid_osnet(arch, torchreid_osnet, tmp_path):
    model = tiny(arch)
    with torch.no_grad():  # logits of a size that a wrongly folded BNNeck would show (its init is 0.001-sized)
        model.classifier.weight.normal_()
    out = tmp_path / f"{arch}_kdreid.pth"
    export_model(model, out, "torchreid", images=images(2))
    state = torch.load(out, map_location="cpu", weights_only=True)
    if arch == "osnet_x0_25":
        reference = torchreid_osnet.osnet_x0_25(num_classes=5, pretrained=False)
    else:  # the same class at our tiny widths
        block = torchreid_osnet.OSBlock
        reference = torchreid_osnet.OSNet(5, blocks=[block] * 3, layers=[1, 1, 1], channels=[16, 64, 64, 64],
                                          feature_dim=32)
    reference.load_state_dict(state, strict=True)  # every key and shape is torchreid's, classifier bias included
    reference.eval()
    x = images(3, seed=7)
    with torch.no_grad():
        theirs = reference(normalise(x))  # torchreid takes normalised images and returns its fc feature
        ours = model(x, return_all=True).embedding  # our pre-BNNeck embedding: the same space
        logits_theirs = reference.classifier(theirs)
    assert theirs.std() > 1e-3
    assert (theirs - ours).abs().max().item() <= 1e-5
    with torch.no_grad():  # the classifier too, with the BNNeck folded in: torchreid's logits are ours
        model_logits = model(x, return_all=True).logits
    assert logits_theirs.std() > 1e-3
    assert torch.allclose(logits_theirs, model_logits, atol=1e-5)


@pytest.mark.parametrize("bnneck", [True, False])
def test_torchreid_classifier_is_the_models_own_on_the_pre_bnneck_feature(bnneck):
    # W·BN(x) folded as (W·diag(scale))·x + W·shift, checked against the model's own logits without torchreid: with
    # a dead channel (running_var 0, as ReLU-dead features have), where only BatchNorm's eps keeps the scale finite,
    # and without a BNNeck (the classifier is then copied as is, with a zero bias).
    from kdreid.export import torchreid_state_dict

    model = tiny(bnneck=bnneck)
    with torch.no_grad():
        model.classifier.weight.normal_()
        if bnneck:
            model.bnneck.running_var[0] = 0.0
    state = torchreid_state_dict(model)
    with torch.no_grad():
        out = model(images(3, seed=7), return_all=True)
    folded = out.embedding.double() @ state["classifier.weight"].double().T + state["classifier.bias"].double()
    assert torch.isfinite(folded).all() and out.logits.abs().max() > 1e-3
    torch.testing.assert_close(folded, out.logits.double(), rtol=1e-4, atol=1e-4 * out.logits.abs().max().item())


def test_torchreid_format_refuses_what_torchreid_cannot_hold(tmp_path):
    with pytest.raises(ModelError, match="OSNet"):
        export_model(tiny("resnet_tiny"), tmp_path / "r.pth", "torchreid")
    with pytest.raises(ModelError, match="embedding layer"):
        export_model(tiny(embedding_dim=16), tmp_path / "e.pth", "torchreid")
    with pytest.raises(ModelError, match="fp16"):
        export_model(tiny(), tmp_path / "h.pth", "torchreid", fp16=True)
    with pytest.raises(ModelError, match="unknown export format"):
        export_model(tiny(), tmp_path / "x.bin", "tflite")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ refusals
def test_a_failing_check_refuses_and_leaves_no_file(tmp_path, monkeypatch):
    real_runner = export_module._run_torchscript

    def drifting_runner(path):  # an exporter that got the graph slightly wrong
        run = real_runner(path)
        return lambda x: run(x) + 1e-3

    monkeypatch.setattr(export_module, "_run_torchscript", drifting_runner)
    target = tmp_path / "m.ts"
    with pytest.raises(ModelError, match=r"refusing to write .*m\.ts.*max \|diff\| 0\.001\).*graph"):
        export_model(tiny(), target, "torchscript", images=images(2))
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temp file


@pytest.mark.parametrize("fp16", [False, True])
def test_large_features_are_checked_relative_to_their_size(fp16, tmp_path, monkeypatch):
    """A trained model's features have norms ~90-150, and rounding grows with them: the absolute bounds refused
    every trained checkpoint (fp32 ONNX: 3.4e-4 > 1e-4). Features scaled up here (200x for fp16, 5000x for fp32):
    the absolute error passes each old bound, the relative one stays far below the new; a real drift is still
    refused, naming its cause."""
    model = tiny()
    with torch.no_grad():
        model.bnneck.weight.mul_(200 if fp16 else 5000)
        model.bnneck.bias.mul_(200 if fp16 else 5000)
    result = export_model(model, tmp_path / "big.onnx", "onnx", dynamic_batch=True, fp16=fp16, images=images(4))
    if fp16:
        assert result.max_abs_diff > 1e-2 and result.relative_error < 2e-3
    else:
        assert result.max_abs_diff > 1e-4 and result.relative_error < 1e-6

    real_runner = export_module._run_onnx
    monkeypatch.setattr(export_module, "_run_onnx", lambda path: lambda x: real_runner(path)(x) * 1.05)
    cause = "export it without --fp16" if fp16 else "its graph does not reproduce the model"
    with pytest.raises(ModelError, match=rf"differ from PyTorch's by 0\.05\d* relative .*{cause}"):
        export_model(model, tmp_path / "drift.onnx", "onnx", fp16=fp16, images=images(2))
    assert not (tmp_path / "drift.onnx").exists()


@pytest.mark.parametrize("fault, dynamic", [
    ("one image of eight off by 3e-4 relative", False),
    ("one image NaN", False),
    ("off by 1% at batch size 1 only", True),
    ("every image off by 2e-4 relative", True),
])
def test_the_check_catches_the_worst_image_at_every_batch_size_and_nan(fault, dynamic, tmp_path, monkeypatch):
    """Found by a review: a bound ten times looser, the mean instead of the worst image, the better of the two
    batch sizes, a check at the traced batch size only, or NaN features all passed (every drift tested was far
    above the bound)."""
    real_runner = export_module._run_torchscript

    def faulty_runner(path):
        run = real_runner(path)

        def faulty(x):
            out = run(x).clone()
            holds_last = bool((x[-1:] == last).all())  # the batch, or the one image, ends with the last image
            if fault.startswith("one image of eight") and holds_last:
                out[-1] *= 1 + 3e-4
            elif fault == "one image NaN" and holds_last:
                out[-1] = float("nan")
            elif fault.startswith("off by 1%") and len(x) == 1:
                out *= 1.01
            elif fault.startswith("every image"):
                out *= 1 + 2e-4
            return out
        return faulty

    checked = images(8)
    last = checked[-1:]
    monkeypatch.setattr(export_module, "_run_torchscript", faulty_runner)
    with pytest.raises(ModelError, match="refusing to write"):
        export_model(tiny(), tmp_path / "m.ts", "torchscript", dynamic_batch=dynamic, images=checked)
    assert list(tmp_path.iterdir()) == []
    if fault.startswith("every image"):  # the bound itself: 1e-4 relative in fp32; 5e-5 passes
        monkeypatch.setattr(export_module, "_run_torchscript", lambda path: lambda x: real_runner(path)(x) * (1 + 5e-5))
        assert export_model(tiny(), tmp_path / "m.ts", "torchscript", images=checked).relative_error < 1e-4


def test_the_onnx_contract_names_its_batch_axes(tmp_path):
    # Found by a review: an output batch axis not declared dynamic (a fixed [2, D] for TensorRT) and a static
    # file recording "[N, ...]" passed.
    import onnx

    export_model(tiny(), tmp_path / "d.onnx", "onnx", dynamic_batch=True, images=images(2))
    graph = onnx.load(tmp_path / "d.onnx").graph
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    result = export_model(tiny(), tmp_path / "s.onnx", "onnx", dynamic_batch=False, images=images(2))
    assert result.metadata["input_shape"] == f"[1, 3, {SIZE[0]}, {SIZE[1]}]"


def test_an_exporter_failure_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    def broken_export(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::weird' to ONNX opset version 18 is not supported.\nmore")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(ModelError, match=r"^ONNX \(opset 18\) cannot take osnet_tiny: RuntimeError: .*aten::weird"):
        export_model(tiny(), tmp_path / "m.onnx", "onnx")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ command
@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, tiny(), extra={"input_size": list(SIZE)})
    return path


def test_export_command(checkpoint, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (80, 40, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    out = tmp_path / "tiny.onnx"
    assert main(["export", "--model", str(checkpoint), "--format", "onnx", "--out", str(out), "--dynamic-batch",
                 "--images", str(folder)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {out} (onnx, dynamic batch)") and line.endswith("on 3 images")
    assert read_metadata(out)["source_checkpoint"] == "tiny.pt"
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()  # readable as any new file, not mkstemp's 0600

    assert main(["export", "--model", str(tmp_path / "missing.pt"), "--format", "onnx", "--out", str(out)]) == 2
    assert main(["export", "--model", str(checkpoint), "--format", "onnx", "--out", str(out), "--images",
                 str(tmp_path / "nowhere")]) == 2
    resnet = tmp_path / "resnet.pt"
    save_checkpoint(resnet, tiny("resnet_tiny"), extra={"input_size": list(SIZE)})
    assert main(["export", "--model", str(resnet), "--format", "torchreid", "--out", str(tmp_path / "r.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "missing.pt does not exist" in err[0] and "nowhere is not a folder" in err[1]
    assert "--format torchreid takes OSNet models" in err[2]
    assert not (tmp_path / "r.pth").exists()


def test_export_refuses_a_state_dict_of_another_architecture(tmp_path, capsys):
    plain = tmp_path / "osnet_tiny.pth"
    torch.save(tiny().state_dict(), plain)
    out = tmp_path / "wrong.onnx"
    assert main(["export", "--model", str(plain), "-a", "osnet_x0_25", "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "backbone tensors are missing" in err[0] and "pass the right -a" in err[0]
    assert not out.exists()


def test_export_command_takes_the_input_size(tmp_path, capsys):
    """A plain state dict records no size: --height/--width set the file's input shape and its contract."""
    from kdreid.export import read_metadata as metadata_of

    plain = tmp_path / "plain.pth"
    torch.save(tiny().state_dict(), plain)
    out = tmp_path / "sized.onnx"
    assert main(["export", "--model", str(plain), "-a", "osnet_tiny", "--format", "onnx", "--out", str(out),
                 "--height", "48", "--width", "24"]) == 0
    metadata = metadata_of(out)
    assert (metadata["input_height"], metadata["input_width"]) == ("48", "24")
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 48, 24]


def test_export_to_a_folder_is_one_line_before_any_work(checkpoint, tmp_path, capsys):
    folder = tmp_path / "exports"
    folder.mkdir()
    assert main(["export", "--model", str(checkpoint), "--format", "onnx", "--out", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kdreid: error: cannot write {folder}: it is a folder, not a file; give a file path such as "
                   f"{folder / 'model.onnx'}"]
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["exports", "tiny.pt"]


# ------------------------------------------------------------------------------------------------ the disk
def _export(checkpoint, out, format: str = "onnx") -> int:
    return main(["export", "--model", str(checkpoint), "--format", format, "--out", str(out)])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("failure", ["full disk", "read-only folder"])
def test_a_disk_that_cannot_take_the_file_is_one_line_naming_it_and_leaves_nothing(
        format, failure, checkpoint, tmp_path, monkeypatch, capsys):
    """Full disk: onnx blamed the model ("ONNX cannot take osnet_tiny: OSError: No space left"), torchscript's C++
    writer aborted the process (rc 134) leaving its temp file, torchreid had a traceback. Read-only folder: a
    traceback naming the temp file, in every format. Simulated: chmod does not stop root."""
    from kdreid import rundir

    out = tmp_path / f"m.{SUFFIXES[format]}"
    if failure == "full disk":  # often reported only by fsync, once the bytes are in the temp file
        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(rundir.os, "fsync", fsync)
        reason = "no space left on the device"
    else:
        real_mkstemp = rundir.tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir == str(tmp_path):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(dir, f".{out.name}.x.tmp"))
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(rundir.tempfile, "mkstemp", mkstemp)
        reason = "read-only file system"
    assert _export(checkpoint, out, format) == 2
    assert _one_error_line(capsys).startswith(f"kdreid: error: cannot write {out}: {reason}; ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pt"]  # neither the file nor a temp file


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="a read-only folder does not stop root")
def test_a_read_only_folder_is_one_line(checkpoint, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert _export(checkpoint, folder / "m.onnx", "torchscript") == 2
        line = _one_error_line(capsys)
        assert line.startswith(f"kdreid: error: cannot write {folder / 'm.onnx'}: permission denied; ")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("where", ["afile/m.onnx", "afile/sub/m.onnx", "link/m.onnx"])
def test_a_path_through_a_file_is_one_line_before_any_work(where, checkpoint, tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")

    def exporter_ran(*args, **kwargs):
        raise AssertionError("exported before refusing the path")

    monkeypatch.setattr(export_module, "_write_onnx", exporter_ran)
    out = tmp_path / where
    assert _export(checkpoint, out) == 2
    line = _one_error_line(capsys)
    if where.startswith("link"):
        assert line == (f"kdreid: error: cannot write {out}: {tmp_path / 'link'} is a link to {tmp_path / 'nowhere'}, "
                        "which does not exist; create that folder or choose another path")
    else:
        assert line == (f"kdreid: error: cannot write {out}: {tmp_path / 'afile'} is a file where a folder is needed; "
                        "move that file or choose another path")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "link", "tiny.pt"]


def test_nothing_is_on_disk_while_the_export_is_checked(tmp_path, monkeypatch):
    # The file exists only during the atomic write (milliseconds), not through the export and its check (seconds):
    # a SIGTERM then leaves nothing. The check runs on the very bytes that are written.
    real_runner = export_module._run_torchscript
    seen = []

    def runner(data):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        return real_runner(data)

    monkeypatch.setattr(export_module, "_run_torchscript", runner)
    export_model(tiny(), tmp_path / "m.pt", "torchscript", images=images(2))
    assert seen == [[]] and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_export_builds_a_plain_state_dict_with_its_last_stride_and_embedding_layer(tmp_path, capsys):
    # Found by a review: `-a ARCH` always rebuilt last stride 1 (a torchreid ResNet's file, trained with 2, was
    # exported as another model, and the check passed against that other model) and refused a file's embedding layer.
    model = tiny("resnet_tiny", last_stride=2, embedding_dim=8)
    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": model.state_dict()}, plain)
    out = tmp_path / "plain.onnx"
    assert main(["export", "--model", str(plain), "-a", "resnet_tiny", "--last-stride", "2", "--format", "onnx",
                 "--out", str(out), "--dynamic-batch", "--height", str(SIZE[0]), "--width", str(SIZE[1])]) == 0
    assert "kdreid: loaded " in capsys.readouterr().err
    x = images(3)
    assert np.abs(run_onnx(out, x) - expected(model, x)).max() <= 1e-4
