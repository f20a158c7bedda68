"""Weight files: ImageNet resolution from the torch cache, other toolkits' containers and key spellings,
the load summary, refusals."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision

from kdreid.errors import ModelError
from kdreid.models import build_model, get_spec, load_weights


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def test_imagenet_file_names_are_torchvisions():
    assert get_spec("resnet50").imagenet[0] == torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    assert get_spec("resnet18").imagenet[0] == torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    assert get_spec("mobilenetv2_x1_0").imagenet[0] == (
        torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    )


def test_imagenet_missing_says_which_file_where(torch_home):
    with pytest.raises(ModelError) as error:
        build_model("resnet50", 3, pretrained="imagenet")
    message = str(error.value)
    assert "resnet50-0676ba61.pth" in message and str(torch_home / "hub" / "checkpoints") in message
    assert "weights='IMAGENET1K_V1'" in message and "\n" not in message
    with pytest.raises(ModelError, match="osnet_x0_25_imagenet.pth.*MODEL_ZOO"):
        build_model("osnet_x0_25", 3, pretrained="imagenet")
    with pytest.raises(ModelError, match="no ImageNet weights"):
        build_model("mobilenetv2_x1_4", 3, pretrained="imagenet")


def test_imagenet_loads_from_the_hub_cache(torch_home, caplog):
    reference = torchvision.models.resnet18(weights=None)
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(reference.state_dict(), folder / "resnet18-f37072fd.pth")
    with caplog.at_level(logging.INFO, logger="kdreid.models"):
        model = build_model("resnet18", 3, pretrained="imagenet")
    assert torch.equal(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    summary = [r.getMessage() for r in caplog.records if "loaded" in r.getMessage()]
    assert len(summary) == 1 and summary[0] == model.load_report.summary()
    assert "discarded: fc.weight, fc.bias" in summary[0] and "missing" in summary[0]


def test_torchreid_imagenet_location_is_read(torch_home):
    """torchreid keeps its OSNet ImageNet files in $TORCH_HOME/checkpoints/<name>_imagenet.pth."""
    spec = get_spec("osnet_x0_25")
    (torch_home / "checkpoints").mkdir(parents=True)
    imagenet = build_model("osnet_x0_25", 1000).state_dict()
    torch.save(imagenet, torch_home / "checkpoints" / spec.imagenet[0])
    model = build_model("osnet_x0_25", 3, pretrained="imagenet")
    assert torch.equal(model.fc[0].weight, imagenet["fc.0.weight"])


def _resnet_tiny_state(seed=0):
    """A resnet_tiny's state with random BatchNorm statistics and affine weights, BNNeck included: a fresh model's
    identity BatchNorms would equal a file's that was not loaded (a review found a BNNeck rename could go)."""
    from tests.reference import randomise_batchnorm

    torch.manual_seed(seed)
    model = build_model("resnet_tiny", 0, bnneck=True)
    randomise_batchnorm(model, seed)
    return model.state_dict()


def test_fastreid_container_and_prefixes(tmp_path):
    state = _resnet_tiny_state()
    spelled = {("backbone." + k if not k.startswith("bnneck") else k.replace("bnneck.", "heads.bottleneck.0.")): v
               for k, v in state.items()}
    path = tmp_path / "fastreid.pth"
    torch.save({"model": spelled, "iteration": 100}, path)
    model = build_model("resnet_tiny", 0)
    report = load_weights(model, path)
    assert report.missing == [] and report.discarded == []
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value)


def test_spcl_container_with_dsbn_branches(tmp_path):
    """SpCL: module.base.{0,1,4..7} (its ResNet as a Sequential), feat_bn, and BN_S / BN_T branches."""
    state = _resnet_tiny_state()
    batchnorms = {name for name, m in build_model("resnet_tiny", 0).named_modules()
                  if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    names = {"conv1": "base.0", "bn1": "base.1", "layer1": "base.4", "layer2": "base.5", "layer3": "base.6",
             "layer4": "base.7", "bnneck": "feat_bn"}
    spcl = {}
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        head, rest = key.split(".", 1)
        new = f"module.{names[head]}.{rest}"
        if module in batchnorms:  # SpCL's DSBN: a source and a target branch
            stem = new.rsplit(".", 1)[0]
            spcl[f"{stem}.BN_S.{leaf}"] = torch.zeros_like(value)
            spcl[f"{stem}.BN_T.{leaf}"] = value
        else:
            spcl[new] = value
    path = tmp_path / "spcl.pth.tar"
    torch.save({"state_dict": spcl, "epoch": 49, "best_mAP": 0.7}, path)
    model = build_model("resnet_tiny", 0, pretrained=path)
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key  # the target branch was taken

    # into a DSBN model the branches become domains 0 (source) and 1 (target)
    from kdreid.models import convert_dsbn

    dsbn = convert_dsbn(build_model("resnet_tiny", 0), 2)
    load_weights(dsbn, path)
    assert torch.equal(dsbn.bn1.bns[1].weight, state["bn1.weight"])
    assert torch.equal(dsbn.bn1.bns[0].weight, torch.zeros_like(state["bn1.weight"]))


def test_refuses_weights_of_another_architecture(tmp_path):
    path = tmp_path / "osnet.pth"
    torch.save(build_model("osnet_tiny", 3).state_dict(), path)
    with pytest.raises(ModelError, match="none of its .* tensors fit resnet_tiny's backbone"):
        build_model("resnet_tiny", 3, pretrained=path)


def test_head_shape_mismatch_is_discarded_not_fatal(tmp_path):
    """Another toolkit's (or ImageNet's) classifier has other classes: it is left out, the backbone loads."""
    torch.manual_seed(0)
    state = build_model("resnet_tiny", 7).state_dict()
    path = tmp_path / "other_classes.pth"
    torch.save(state, path)
    model = build_model("resnet_tiny", 3)
    report = load_weights(model, path)
    assert report.discarded == ["classifier.weight"] and report.missing == ["classifier.weight"]
    assert torch.equal(model.layer4[0].conv1.weight, state["layer4.0.conv1.weight"])


def test_backbone_shape_mismatch_is_refused(tmp_path):
    state = _resnet_tiny_state()
    state["layer4.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    model = build_model("resnet_tiny", 0)
    before = model.layer1[0].conv1.weight.detach().clone()
    with pytest.raises(ModelError) as error:
        load_weights(model, path)
    message = str(error.value)
    assert "1 of resnet_tiny's" in message and "layer4.0.conv1.weight" in message and "\n" not in message
    assert torch.equal(model.layer1[0].conv1.weight, before)  # nothing was loaded


def test_partly_fitting_weights_of_another_architecture_are_refused(tmp_path):
    """osnet_tiny's state dict fits some of osnet_x0_25's tensors by name and shape, not its whole backbone: a
    model evaluated or exported from such a mix would give silently wrong features."""
    path = tmp_path / "osnet_tiny.pth"
    torch.save(build_model("osnet_tiny", 0).state_dict(), path)
    with pytest.raises(ModelError, match=r"of osnet_x0_25's \d+ backbone tensors are missing .*pass the right -a"):
        build_model("osnet_x0_25", 0, pretrained=path)


def test_a_head_tensor_the_model_lacks_is_discarded_not_refused(tmp_path):
    """torchreid's classifier has a bias, kdreid's none: a torchreid file to train from (num_classes > 0) loads, its
    classifier.bias discarded; only tensors inside the backbone that the model lacks are refused."""
    state = _resnet_tiny_state()
    features = state["bnneck.weight"].shape[0]
    state.update({"classifier.weight": torch.rand(5, features), "classifier.bias": torch.rand(5)})
    path = tmp_path / "torchreid.pth.tar"
    torch.save({"state_dict": state, "epoch": 60}, path)
    model = build_model("resnet_tiny", 5, pretrained=str(path))
    assert model.load_report.discarded == ["classifier.bias"] and model.load_report.missing == []
    assert torch.equal(model.classifier.weight, state["classifier.weight"])


def test_a_missing_head_is_not_fatal(tmp_path):
    """A backbone-only file (ImageNet weights, a toolkit without BNNeck) loads; the head keeps its init."""
    state = {k: v for k, v in _resnet_tiny_state().items() if not k.startswith("bnneck.")}
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    report = load_weights(build_model("resnet_tiny", 4), path)
    assert report.missing and all(k.startswith(("bnneck.", "classifier.")) for k in report.missing)


@pytest.mark.parametrize("numpy_module", ["numpy._core.multiarray", "numpy.core.multiarray"])
def test_torchreid_checkpoint_with_numpy_metrics(tmp_path, numpy_module):
    """torchreid / SpCL store rank1 / best_mAP as numpy scalars, in files written by numpy 1.x (numpy.core)
    or 2.x (numpy._core), often in torch's legacy (non-zip) format: they load, still with weights_only."""
    import numpy as np

    state = _resnet_tiny_state()
    path = tmp_path / "model.pth.tar"
    torch.save({"state_dict": state, "epoch": 60, "rank1": np.float32(0.87), "mAP": np.float64(0.7),
                "cmc": np.arange(3, dtype=np.float32)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes().replace(b"numpy._core.multiarray", numpy_module.encode())
    path.write_bytes(data)
    model = build_model("resnet_tiny", 0, pretrained=path)
    assert torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


@pytest.mark.parametrize("old_torch", ["2.4", "2.5"])
def test_numpy_metrics_load_on_the_oldest_torch(tmp_path, monkeypatch, old_torch):
    """pyproject allows torch 2.4. Torch 2.4 has no torch.serialization.safe_globals context, only the
    process-wide add_safe_globals, and refuses `_codecs.encode` (bytes in the legacy format); 2.4 and 2.5 know an
    allowed global by its own __module__.__name__, no `(object, name)` pairs. A torchreid file with numpy metrics
    loads there too, a code-running global is still refused in one line, and the allow-list is as it was."""
    import numpy as np
    from torch import _weights_only_unpickler as unpickler

    from kdreid.models.weights import UnsafeCheckpointError

    if old_torch == "2.4":
        monkeypatch.delattr(torch.serialization, "safe_globals", raising=False)
    else:
        monkeypatch.setattr(unpickler, "_get_user_allowed_globals",
                            lambda: {f"{f.__module__}.{f.__name__}": f for f in unpickler._get_safe_globals()})
    before = set(torch.serialization.get_safe_globals())  # a set on later torch: its order is not kept
    state = _resnet_tiny_state()
    path = tmp_path / "model.pth.tar"
    torch.save({"state_dict": state, "rank1": np.float32(0.87), "cmc": np.arange(3, dtype=np.float32)}, path,
               _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    model = build_model("resnet_tiny", 0, pretrained=path)
    assert torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert set(torch.serialization.get_safe_globals()) == before
    torch.save({"state_dict": state, "hook": logging.getLogger}, tmp_path / "code.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"refused, loading it would run code \(it needs logging.getLogger"):
        build_model("resnet_tiny", 0, pretrained=tmp_path / "code.pth")
    assert set(torch.serialization.get_safe_globals()) == before


def test_openunreid_mean_teacher_with_dsbn(tmp_path):
    """OpenUnReID (MMT-style): module.{net,mean_net}.backbone.*, head.feat_bn, dsbn.N branches; the mean
    network and the last (target) domain are the ones evaluated, so those load."""
    state = _resnet_tiny_state(seed=1)
    batchnorms = {name for name, m in build_model("resnet_tiny", 0).named_modules()
                  if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    checkpoint = {}
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        spelled = "head.feat_bn." + leaf if module == "bnneck" else "backbone." + key
        if module in batchnorms:
            stem = spelled.rsplit(".", 1)[0]
            for domain in range(3):
                branch = value if domain == 2 else torch.full_like(value, float(domain + 7))
                checkpoint[f"module.mean_net.{stem}.dsbn.{domain}.{leaf}"] = branch
        else:
            checkpoint[f"module.mean_net.{spelled}"] = value
        checkpoint[f"module.net.{spelled}"] = torch.zeros_like(value)  # the student: set aside
    path = tmp_path / "openunreid.pth"
    torch.save({"state_dict": checkpoint, "epoch": 40}, path)
    model = build_model("resnet_tiny", 0)
    report = load_weights(model, path)
    assert report.missing == []
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(k.startswith("module.net.") or ".dsbn.0." in k or ".dsbn.1." in k for k in report.discarded)


def _traced(path):
    import warnings

    model = build_model("resnet_tiny", 0).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.trace is deprecated": it still writes the file
        torch.jit.trace(model, torch.rand(1, 3, 32, 16)).save(str(path))  # plain TorchScript: no kdreid metadata
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: _traced(p / "model.ts"), "an exported TorchScript model; this command takes a kdreid checkpoint"),
    (lambda p: (p / "model.onnx").write_bytes(b"\x08\x08\x12\x07pytorch") and p / "model.onnx",
     "an exported ONNX model; this command takes a kdreid checkpoint"),
    (lambda p: (p / "junk.pt").write_text("hello, not weights\n") and p / "junk.pt", "junk.pt: not a PyTorch file"),
])
def test_files_that_are_not_weights_say_what_they_are(make, message, tmp_path):
    from kdreid.errors import CheckpointError

    path = make(tmp_path)
    with pytest.raises(CheckpointError) as error:
        build_model("resnet_tiny", 0, pretrained=path)
    text = str(error.value)
    assert message in text and "pickle" not in text and "truncated" not in text and "\n" not in text


def test_a_pickle_is_still_called_one(tmp_path):
    import pickle

    from kdreid.models.weights import UnsafeCheckpointError

    path = tmp_path / "objects.pkl"
    path.write_bytes(pickle.dumps({"weights": [1, 2]}))
    with pytest.raises(UnsafeCheckpointError, match="a pickle of arbitrary objects"):
        build_model("resnet_tiny", 0, pretrained=path)


def test_a_training_checkpoint_is_named_with_the_file_to_pass_instead(tmp_path):
    """RUN/checkpoints/last.pt is complete, just not a model: say so, and which file to pass."""
    from kdreid.errors import CheckpointError
    from kdreid.stages.loop import TRAINING_STATE_FORMAT, save_training_state

    model = build_model("resnet_tiny", 3)
    optimizer = torch.optim.Adam(model.parameters())
    state = {"format": TRAINING_STATE_FORMAT, "epoch": 2, "modules": {"model": model.state_dict()},
             "optimizer": optimizer.state_dict(), "rng": {"torch": torch.get_rng_state()}}
    last = tmp_path / "checkpoints" / "last.pt"
    last.parent.mkdir()
    save_training_state(last, state)
    headerless = tmp_path / "headerless.pt"  # as written before the checksum header existed
    torch.save(state, headerless)
    for path in (last, headerless):
        with pytest.raises(CheckpointError, match=r"training checkpoint, not a model; pass RUN/model.pt \(this is "
                                                  r"the training state for --resume\)"):
            build_model("resnet_tiny", 3, pretrained=path)


@pytest.mark.parametrize("layout", ["spcl", "openunreid"])
def test_an_embedding_layer_in_the_file_is_loaded_or_refused_never_dropped(tmp_path, layout):
    from kdreid.models.weights import embedding_dim_of
    from tests.reference import randomise_batchnorm

    # SpCL's and the original KD-ReID code's layout: backbone, `feat` (Linear), `feat_bn`, classifier;
    # OpenUnReID's: module.mean_net.backbone.*, head.feat_reduction (Linear), head.feat_bn.
    trained = build_model("resnet_tiny", 5, embedding_dim=24)
    randomise_batchnorm(trained)
    if layout == "spcl":
        state = {k.replace("embed.", "feat.").replace("bnneck.", "feat_bn."): v
                 for k, v in trained.state_dict().items()}
    else:
        head = {"embed": "head.feat_reduction", "bnneck": "head.feat_bn"}
        state = {"module.mean_net." + (head[k.split(".")[0]] + "." + k.split(".", 1)[1]
                                       if k.split(".")[0] in head else "backbone." + k): v
                 for k, v in trained.state_dict().items() if not k.startswith("classifier")}
    path = tmp_path / "seed.pth.tar"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ModelError, match=r"holds an embedding layer \(\d+ -> 24\) that this resnet_tiny was built "
                                         r"without; build it with embedding_dim=24"):
        build_model("resnet_tiny", 5, pretrained=str(path))
    assert embedding_dim_of(path) == 24
    # Built with another embedding size: the layer and the BNNeck do not fit, and were discarded, silently.
    with pytest.raises(ModelError, match=r"holds an embedding layer \((\d+) -> 24\) that this resnet_tiny was built "
                                         r"with another one \(\1 -> 32\); build it with embedding_dim=24"):
        build_model("resnet_tiny", 5, pretrained=str(path), embedding_dim=32)
    loaded = build_model("resnet_tiny", 5, pretrained=str(path), embedding_dim=embedding_dim_of(path)).eval()
    images = torch.rand(2, 3, 32, 16)
    assert torch.allclose(loaded(images), trained.eval()(images), atol=1e-6)


def _fastreid_spelling(state):
    """fast-reid's Baseline: `backbone.*`, `heads.bottleneck` (with EMBEDDING_DIM > 0 a 1×1 conv without bias, then
    the BNNeck as `.1`; else the BNNeck as `.0`), the classifier as `heads.weight`."""
    embedding = "embed.weight" in state
    out = {}
    for key, value in state.items():
        head, rest = key.split(".", 1)
        if head == "embed":
            if rest == "weight":
                out["heads.bottleneck.0.weight"] = value[:, :, None, None]
        elif head == "bnneck":
            out[f"heads.bottleneck.{int(embedding)}.{rest}"] = value
        elif head == "classifier":
            out["heads.weight"] = value
        else:
            out["backbone." + key] = value
    return out


def test_fastreid_embedding_dim_head_is_loaded_not_dropped(tmp_path):
    """fast-reid with MODEL.HEADS.EMBEDDING_DIM > 0: heads.bottleneck.0 is a 1×1 conv (the embedding), .1 the BNNeck.
    A review found both discarded: the pooled 2048-d feature was evaluated through a fresh BNNeck, silently."""
    from kdreid.models.weights import embedding_dim_of
    from tests.reference import randomise_batchnorm

    torch.manual_seed(0)
    trained = build_model("resnet_tiny", 5, embedding_dim=24)
    randomise_batchnorm(trained)
    torch.nn.init.zeros_(trained.embed.bias)  # fast-reid's conv has no bias
    path = tmp_path / "model_final.pth"
    torch.save({"model": _fastreid_spelling(trained.state_dict()), "iteration": 100, "optimizer": {}}, path)
    assert embedding_dim_of(path) == 24
    with pytest.raises(ModelError, match=r"holds an embedding layer \(\d+ -> 24\) .* build it with embedding_dim=24"):
        build_model("resnet_tiny", 0, pretrained=str(path))
    loaded = build_model("resnet_tiny", 0, pretrained=str(path), embedding_dim=24).eval()
    assert loaded.load_report.missing == [] and loaded.load_report.discarded == ["heads.weight"]
    images = torch.rand(2, 3, 32, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(images), trained.eval()(images), atol=1e-6)


def _fastreid_resnet_tiny(tmp_path, extra):
    state = _fastreid_spelling(_resnet_tiny_state())
    state.update(extra)
    path = tmp_path / "model_final.pth"
    torch.save({"model": state}, path)
    return path


@pytest.mark.parametrize("extra, message", [
    # SBS configs: POOL_LAYER GeneralizedMeanPoolingP, whose exponent is learnt
    ({"heads.pool_layer.p": torch.tensor([3.2])},
     r"pools with generalized-mean pooling \(heads.pool_layer.p = 3.2, fast-reid's GeneralizedMeanPoolingP\) where "
     r"resnet_tiny pools by average"),
    # WITH_NL: non-local blocks after blocks of layer2 / layer3
    ({f"backbone.NL_2.0.{name}.weight": torch.rand(4, 8, 1, 1) for name in ("g", "theta", "phi")},
     r"its backbone holds 3 tensors that resnet_tiny has no place for \(e.g. backbone.NL_2.0.g.weight: fast-reid's "
     r"non-local blocks \(MODEL.BACKBONE.WITH_NL\)\)"),
    # WITH_SE: a squeeze-and-excitation layer inside each block
    ({"backbone.layer1.0.se.fc.0.weight": torch.rand(2, 8)},
     r"its backbone holds 1 tensor that resnet_tiny has no place for \(e.g. backbone.layer1.0.se.fc.0.weight: "
     r"squeeze-and-excitation"),
])
def test_fastreid_layers_kdreid_lacks_are_refused_not_dropped(tmp_path, extra, message):
    """A review found GeM's exponent, non-local blocks and SE layers discarded: the backbone 'fit', and the model
    gave another network's features, silently."""
    path = _fastreid_resnet_tiny(tmp_path, extra)
    with pytest.raises(ModelError, match=message) as error:
        build_model("resnet_tiny", 0, pretrained=str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_fastreid_ibn_is_named_as_such(tmp_path):
    """IBN-a (fast-reid's WITH_IBN, torchreid's resnet50_ibn_a) splits bn1 into bn1.IN / bn1.BN: the refusal says so,
    not 'pass the right -a' (no -a reads it)."""
    state = _fastreid_spelling(_resnet_tiny_state())
    ibn = {}
    for key, value in state.items():
        if key.startswith("backbone.layer1.") and ".bn1." in key:
            stem, leaf = key.rsplit(".", 1)
            half = value.shape[0] // 2 if value.ndim else 0
            if leaf in ("weight", "bias"):
                ibn[f"{stem}.IN.{leaf}"] = value[:half]
            ibn[f"{stem}.BN.{leaf}"] = value[half:] if value.ndim else value
        else:
            ibn[key] = value
    path = tmp_path / "ibn.pth"
    torch.save({"model": ibn}, path)
    with pytest.raises(ModelError, match=r"an IBN-Net model \(instance normalisation, e.g. backbone.layer1.0.bn1.IN."
                                         r"weight: fast-reid's MODEL.BACKBONE.WITH_IBN"):
        build_model("resnet_tiny", 0, pretrained=str(path))


def test_fastreid_resnet_notes_its_stem(tmp_path):
    """fast-reid's ResNet max-pools its stem without padding (ceil_mode): the load summary says the features are close
    to fast-reid's, not equal."""
    model = build_model("resnet_tiny", 0, pretrained=str(_fastreid_resnet_tiny(tmp_path, {})))
    assert "note: fast-reid's ResNet max-pools its stem without padding" in model.load_report.summary()
    plain = tmp_path / "plain.pth"
    torch.save(_resnet_tiny_state(), plain)
    assert "note:" not in build_model("resnet_tiny", 0, pretrained=str(plain)).load_report.summary()
    # OpenUnReID's files also spell their backbone `backbone.`; its ResNet is torchvision's, padded stem included.
    openunreid = tmp_path / "openunreid.pth"
    spelled = {("head.feat_bn." + k[len("bnneck."):] if k.startswith("bnneck.") else "backbone." + k): v
               for k, v in _resnet_tiny_state().items()}
    torch.save({"state_dict": spelled}, openunreid)
    model = build_model("resnet_tiny", 0, pretrained=str(openunreid))
    assert model.load_report.missing == [] and "note:" not in model.load_report.summary()


def test_fastreid_embedding_head_without_classifier_notes_its_stem(tmp_path):
    """A review found the note lost for a fast-reid file whose only head is the embedding (`heads.bottleneck.0/1`,
    its classifier removed): the head was renamed to embed / bnneck before the note looked for `heads.` keys."""
    trained = build_model("resnet_tiny", 0, embedding_dim=24)
    state = {k: v for k, v in _fastreid_spelling(trained.state_dict()).items() if not k.startswith("heads.weight")}
    path = tmp_path / "model_final.pth"
    torch.save({"model": state}, path)
    model = build_model("resnet_tiny", 0, pretrained=str(path), embedding_dim=24)
    assert "note: fast-reid's ResNet max-pools its stem without padding" in model.load_report.summary()


def test_fastreid_non_local_blocks_of_a_backbone_saved_alone_are_refused(tmp_path):
    """fast-reid's backbone state dict alone (no `backbone.` prefix): its NL_* blocks are top-level modules, which a
    review found discarded silently, where the docs say such a file is never loaded without them."""
    state = {**_resnet_tiny_state(), **{f"NL_2.0.{name}.weight": torch.rand(4, 8, 1, 1) for name in ("g", "phi")}}
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"its backbone holds 2 tensors that resnet_tiny has no place for \(e.g. "
                                         r"NL_2.0.g.weight: fast-reid's non-local blocks"):
        build_model("resnet_tiny", 0, pretrained=str(path))


@pytest.mark.parametrize("wrap", ["compiled", "dataparallel+compiled"])
def test_torch_compile_prefix_is_stripped(tmp_path, wrap):
    """A state dict saved from torch.compile(model) spells every key `_orig_mod.…` (after `module.` under DDP)."""
    trained = build_model("resnet_tiny", 3)
    from tests.reference import randomise_batchnorm

    randomise_batchnorm(trained)
    state = torch.compile(trained).state_dict()
    assert all(k.startswith("_orig_mod.") for k in state)
    if wrap == "dataparallel+compiled":
        state = {"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}
    path = tmp_path / "compiled.pth"
    torch.save(state, path)
    loaded = build_model("resnet_tiny", 3, pretrained=str(path)).eval()
    assert loaded.load_report.missing == [] and loaded.load_report.discarded == []
    images = torch.rand(2, 3, 32, 16)
    with torch.no_grad():
        assert torch.equal(loaded(images), trained.eval()(images))


def test_fastreid_osnet_without_fc_is_named_as_such(tmp_path):
    """fast-reid's OSNet has no `fc` after the pooling (its head pools conv5): not 'pass the right -a', which no -a
    satisfies."""
    state = {"backbone." + k: v for k, v in build_model("osnet_tiny", 0).state_dict().items()
             if not k.startswith(("fc.", "bnneck."))}
    path = tmp_path / "osnet_fastreid.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ModelError, match=r"an OSNet without the fc layer after the pooling \(fast-reid's OSNet"):
        build_model("osnet_tiny", 0, pretrained=str(path))


def test_fastreid_0x_bnneck_head_is_loaded(tmp_path):
    """fast-reid 0.x's BNneckHead keeps its BNNeck as `heads.bnneck` and evaluates its output: it loads as ours (a
    review found it discarded, the feature going through a fresh BNNeck)."""
    state = _resnet_tiny_state()
    spelled = {("heads." + k if k.startswith("bnneck.") else "backbone." + k): v for k, v in state.items()}
    path = tmp_path / "model_final.pth"
    torch.save({"model": spelled}, path)
    model = build_model("resnet_tiny", 0, pretrained=str(path))
    assert model.load_report.missing == [] and model.load_report.discarded == []
    assert torch.equal(model.bnneck.running_var, state["bnneck.running_var"])


def test_fastreid_0x_reduction_head_is_refused(tmp_path):
    """fast-reid 0.x's ReductionHead: conv, BN and LeakyReLU in heads.bottleneck, then heads.bnneck: kdreid's head
    cannot compute it."""
    state = {"backbone." + k: v for k, v in _resnet_tiny_state().items() if not k.startswith("bnneck.")}
    state.update({"heads.bottleneck.0.weight": torch.rand(24, 64, 1, 1), "heads.bottleneck.1.weight": torch.rand(24),
                  "heads.bnneck.weight": torch.rand(24), "heads.bnneck.running_var": torch.rand(24)})
    path = tmp_path / "model_final.pth"
    torch.save({"model": state}, path)
    from kdreid.models.weights import embedding_dim_of

    for embedding_dim in (0, 24):
        with pytest.raises(ModelError, match=r"fast-reid's ReductionHead \(heads.bottleneck: 1×1 conv, BN and LeakyReLU"):
            build_model("resnet_tiny", 0, pretrained=str(path), embedding_dim=embedding_dim)
    assert embedding_dim_of(path) == 0
