"""Reading weights into a model: ImageNet files from the local torch cache, state dicts from other toolkits,
kdreid checkpoints. Files are opened with `torch.load(weights_only=True)` only, so a file cannot run code.

Containers understood: a bare state dict (torchvision), `{"state_dict": ...}` (torchreid, SpCL, OpenUnReID,
kdreid), `{"model": ...}` (fast-reid). Key spellings understood: `module.` and `_orig_mod.` prefixes (DataParallel /
DDP, torch.compile), fast-reid's `backbone.` and `heads.bottleneck` (BNNeck, or 1×1-conv embedding + BNNeck), SpCL's `base.0/1/4-7` (its ResNet as one Sequential) and
`feat_bn`, OpenUnReID's `backbone.`, `head.feat_bn`, `head.feat_reduction` and mean-teacher pairs (`mean_net.`
is kept), and domain-specific BN branches (SpCL's `BN_S` / `BN_T`, OpenUnReID's `dsbn.N`): into a DSBN model
branch by branch, into plain BatchNorm the target one. A model's own spelling always wins.
"""

from __future__ import annotations

import _codecs
import contextlib
import logging
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Mapping

import torch
from torch import nn

from kdreid.errors import CheckpointError, ModelError, why_not_a_file
from kdreid.models.heads import head_key

log = logging.getLogger("kdreid.models")

CHECKPOINT_FORMAT = "kdreid-checkpoint"


# ------------------------------------------------------------------------------------------------ reading
def _numpy_value_globals() -> list:
    """Constructors of numpy scalars and arrays, which torchreid and SpCL store as metrics (rank1, best_mAP).
    They only rebuild values from raw bytes and dtypes: allowing them lets those files load with weights_only
    without allowing anything that runs code."""
    try:
        import numpy as np
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # numpy 1.x
        import numpy as np
        from numpy.core import multiarray
    # _codecs.encode: how pickle protocol 2 (torch's legacy format) spells the raw bytes of a numpy value; torch
    # allows it by default from 2.5 on, torch 2.4 refuses it.
    allowed: list = [np.dtype, np.ndarray, _codecs.encode]
    for function in (multiarray.scalar, multiarray._reconstruct):
        allowed.append(function)
        # files written under numpy 1.x name numpy.core.multiarray; under 2.x, numpy._core.multiarray
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed.append(_named(function, f"{module}.{function.__name__}"))
    for code in "?bBhHiIlLqQefdgFD":
        allowed.append(type(np.dtype(code)))
    return allowed


def _named(function, name: str):
    """`function` allowed under the global name `name` ("module.attribute"). Not torch's `(function, name)` pair:
    torch 2.4 and 2.5 know an allowed global by its own `__module__` and `__name__` (later torch by its
    `__qualname__`), and a pair breaks every load that consults the list."""
    def alias(*args):
        return function(*args)

    alias.__module__, alias.__name__ = name.rsplit(".", 1)
    alias.__qualname__ = alias.__name__
    return alias


@contextlib.contextmanager
def _safe_globals(allowed: list):
    """torch.serialization.safe_globals(allowed), the globals allowed for the loads inside, on torch 2.4 too: that
    torch has no such context (2.5 added it), only the process-wide add_safe_globals, so the list is put back
    as it was after the load."""
    if hasattr(torch.serialization, "safe_globals"):
        with torch.serialization.safe_globals(allowed):
            yield
        return
    before = list(torch.serialization.get_safe_globals())
    torch.serialization.add_safe_globals(allowed)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


class UnsafeCheckpointError(CheckpointError):
    """A file whose unpickling would run code (it names globals beyond tensors and plain values)."""


# A run's training state (stages/loop.py writes and reads it): a dict with this "format", behind a first line
# b"KDREID-TRAINING-STATE 1 sha256=<hex> bytes=<n>\n".
TRAINING_STATE_FORMAT = "kdreid-training-state"
TRAINING_STATE_MAGIC = b"KDREID-TRAINING-STATE "


def model_kind(path: Path) -> str:
    """"onnx", "torchscript" or "checkpoint" (anything else: the checkpoint loader explains what it cannot read).
    ONNX files are protobufs; torch.save files and TorchScript archives are zips, and only TorchScript's hold
    compiled code (`code/`, `constants.pkl`)."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            first = handle.read(1)
        # An ONNX ModelProto starts with field 1 (ir_version, a varint): byte 0x08. Legacy torch.save files
        # start with a pickle opcode (0x80).
        return "onnx" if first == b"\x08" or path.suffix.lower() == ".onnx" else "checkpoint"
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return "torchscript" if any(name.endswith("/constants.pkl") or "/code/" in name for name in names) else "checkpoint"


def read_file(path: str | Path) -> object:
    """torch.load with weights_only=True, turning every failure into one CheckpointError line; files that are
    models of another kind (ONNX, TorchScript, a run's training state) are named as such."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} {why_not_a_file(path)}")
    kind = model_kind(path)
    if kind != "checkpoint":
        raise CheckpointError(
            f"{path}: an exported {'ONNX' if kind == 'onnx' else 'TorchScript'} model; this command takes a kdreid "
            "checkpoint (model.pt) or a state dict; exported files go to `kdreid evaluate`, `extract` and `search`"
        )
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if {"features.npy", "format.npy"} <= set(archive.namelist()):  # np.savez's members, not torch.save's
                raise CheckpointError(f"{path} is a features file (kdreid extract), not a model; pass a kdreid "
                                      "checkpoint (model.pt) here, and the features to `kdreid search --gallery`")
    training_state = CheckpointError(f"{path}: a run's training checkpoint, not a model; pass RUN/model.pt (this "
                                     "is the training state for --resume)")
    try:
        content = safe_load(path, str(path))
    except UnsafeCheckpointError:
        raise
    except CheckpointError:
        # The stages write their training state behind a checksum header, which torch.load cannot read.
        if _is_training_state(path):
            raise training_state from None
        raise
    if isinstance(content, Mapping) and content.get("format") == TRAINING_STATE_FORMAT:  # one without the header
        raise training_state
    return content


def _is_training_state(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(TRAINING_STATE_MAGIC)) == TRAINING_STATE_MAGIC


def safe_load(source: str | Path | IO[bytes], where: str) -> object:
    """torch.load(weights_only=True) of a path or a binary file object: tensors, plain values and numpy values
    only, so a stranger's file cannot run code. Failures: UnsafeCheckpointError (the file asks for code to run),
    CheckpointError (truncated, damaged or not a PyTorch file), each one line naming `where`."""
    try:
        with _safe_globals(_numpy_value_globals()), warnings.catch_warnings():
            # A foreign pickle's protocol is reported below as a refusal; torch's own warning would be a 2nd line.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses any global that is not a tensor/plain type; say which and why. Other unpickling
        # errors ("invalid load key") are damaged files, below.
        if "weights only" in str(error).lower() or "GLOBAL" in str(error):
            found = re.search(r"GLOBAL ([\w.]+)", str(error))
            # Without a named global, the safe unpickler stopped at an opcode torch.save never writes: in a pickle
            # (made by pickle.dump) that means arbitrary objects; in anything else, bytes that are no pickle at all.
            if not found and not _head(source).startswith(_PICKLE_STARTS):
                raise _not_pytorch(where) from None
            detail = (f"refused, loading it would run code (it needs {found.group(1)})" if found else
                      "refused, it is a pickle of arbitrary objects, not weights, and loading it could run code")
            raise UnsafeCheckpointError(
                f"{where}: {detail}; kdreid loads tensors and plain values only "
                "(weights_only); if you trust its author, load it in its own toolkit and re-save the weights with "
                "torch.save(model.state_dict(), 'weights.pth')"
            ) from None
        error_text = str(error)
    except Exception as error:  # torch raises RuntimeError, EOFError, KeyError, ValueError... on damaged bytes
        error_text = str(error).strip() or type(error).__name__
    head = _head(source)
    if head and not head.startswith((b"PK", *_PICKLE_STARTS)):  # neither torch.save's zip nor its legacy pickle
        raise _not_pytorch(where)
    first_line = error_text.strip().splitlines()[0] if error_text.strip() else "empty file"
    raise CheckpointError(
        f"{where}: unreadable ({first_line}); the file is truncated or not a PyTorch checkpoint, copy it again"
    )


# A binary pickle starts with the PROTO opcode and its protocol, 2 to 5 (torch.save's legacy format uses 2).
_PICKLE_STARTS = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))


def _head(source: str | Path | IO[bytes]) -> bytes:
    """The first bytes of a path or of a seekable binary file (its position is kept)."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as handle:
            return handle.read(2)
    position = source.tell()
    source.seek(0)
    head = source.read(2)
    source.seek(position)
    return head


def _not_pytorch(where: str) -> CheckpointError:
    return CheckpointError(f"{where}: not a PyTorch file; pass a kdreid checkpoint (model.pt) or a state dict "
                           "written by torch.save")


def unwrap_state_dict(obj: object, where: str = "file") -> dict[str, torch.Tensor]:
    """The tensors of a bare state dict or of a torchreid / fast-reid / SpCL / kdreid container."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "net", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"{where}: holds no state dict (expected a dict of tensors, or one under 'state_dict')")


# ------------------------------------------------------------------------------------------------ key spellings
_SPCL_RESNET = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


_WRAPPERS = ("module.", "_orig_mod.")  # DataParallel / DDP, and torch.compile's wrapper (OptimizedModule)


def _without_wrappers(key: str) -> str:
    while key.startswith(_WRAPPERS):
        key = key.split(".", 1)[1]
    return key


def _strip_wrappers(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove `module.` and `_orig_mod.` prefixes; of a mean-teacher pair (MMT / OpenUnReID: `net.` and
    `mean_net.`) keep the mean network, the one those methods evaluate; spell fast-reid's embedding head as ours.
    -> (tensors by stripped key, original keys set aside)."""
    stripped: dict[str, tuple[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        stripped[_without_wrappers(key)] = (key, value)
    set_aside = []
    if any(k.startswith("mean_net.") for k in stripped):
        set_aside = [original for k, (original, _) in stripped.items() if not k.startswith("mean_net.")]
        stripped = {k[len("mean_net."):]: v for k, v in stripped.items() if k.startswith("mean_net.")}
    return _fastreid_embedding(stripped), set_aside


def _fastreid_embedding(tensors: dict[str, tuple[str, torch.Tensor]]) -> dict[str, tuple[str, torch.Tensor]]:
    """fast-reid's EmbeddingHead with MODEL.HEADS.EMBEDDING_DIM > 0: `heads.bottleneck` is a 1×1 conv (no bias), the
    embedding layer, then the BNNeck as `heads.bottleneck.1`. Its eval feature is BN(conv(pooled)): ours is
    bnneck(embed(pooled)), so the conv is our `embed` (a Linear of the same weights, bias 0) and `.1` our BNNeck.
    Without an embedding `heads.bottleneck.0` is the BNNeck itself (`_candidates` renames it)."""
    if not _fastreid_conv_bottleneck(tensors) or _fastreid_reduction_head(tensors):
        return tensors  # (the ReductionHead: load_state_dict_into refuses it)
    out = {}
    for key, (original, value) in tensors.items():
        if key == "heads.bottleneck.0.weight":
            out["embed.weight"] = (original, value.flatten(1))
            out["embed.bias"] = (original, torch.zeros(value.shape[0], dtype=value.dtype))
        elif key.startswith("heads.bottleneck.1."):
            out["bnneck." + key[len("heads.bottleneck.1."):]] = (original, value)
        else:
            out[key] = (original, value)
    return out


def _fastreid_conv_bottleneck(tensors: Mapping[str, tuple[str, torch.Tensor]]) -> bool:
    """Whether fast-reid's `heads.bottleneck` starts with a 1×1 conv (an embedding layer), not with the BNNeck."""
    conv = tensors.get("heads.bottleneck.0.weight")
    return conv is not None and conv[1].ndim == 4 and tuple(conv[1].shape[2:]) == (1, 1)


def _fastreid_reduction_head(tensors: Mapping[str, tuple[str, torch.Tensor]]) -> bool:
    """fast-reid 0.x's ReductionHead: a conv `heads.bottleneck` (with a BN and LeakyReLU) before `heads.bnneck`."""
    return _fastreid_conv_bottleneck(tensors) and any(k.startswith("heads.bnneck.") for k in tensors)


def _last_domain(keys) -> str | None:
    """Index of the last domain-specific BN branch (`.dsbn.N.` of OpenUnReID, `.bns.N.` of kdreid): the
    target domain by those toolkits' convention."""
    found = [int(m.group(1)) for k in keys for m in [re.search(r"\.(?:dsbn|bns)\.(\d+)\.", k)] if m]
    return str(max(found)) if found else None


def _candidates(key: str, last_domain: str | None) -> list[str]:
    """Spellings of a foreign key in kdreid's layout, most specific first."""
    out = [key]
    for prefix in ("backbone.", "base_model.", "encoder."):
        if key.startswith(prefix):
            out.append(key[len(prefix):])
    renames = {
        "heads.bottleneck.0.": "bnneck.",  # fast-reid's BNNeck
        "heads.bnneck.": "bnneck.",  # fast-reid 0.x's BNneckHead
        "feat_bn.": "bnneck.",  # SpCL and the original KD-ReID code
        "feat.": "embed.",  # their embedding Linear (pooled feature -> --features), before feat_bn
        "head.feat_bn.": "bnneck.",  # OpenUnReID
        "head.feat_reduction.": "embed.",  # OpenUnReID
    }
    for old, new in renames.items():
        if key.startswith(old):
            out.append(new + key[len(old):])
    match = re.match(r"base\.(\d+)\.(.*)", key)
    if match and match.group(1) in _SPCL_RESNET:  # SpCL's ResNet as one Sequential
        out.append(f"{_SPCL_RESNET[match.group(1)]}.{match.group(2)}")
    # Domain-specific BN. Into a kdreid DSBN model: SpCL's BN_S / BN_T are domains 0 / 1, OpenUnReID's dsbn.N
    # is domain N. Into plain BatchNorm: the target branch (BN_T, or the last domain).
    branches = []
    for k in out:
        branches.append(k.replace(".BN_S.", ".bns.0.").replace(".BN_T.", ".bns.1.").replace(".dsbn.", ".bns."))
        if ".BN_T." in k:
            branches.append(k.replace(".BN_T.", "."))
        if last_domain is not None:
            for name in ("dsbn", "bns"):
                if f".{name}.{last_domain}." in k:
                    branches.append(k.replace(f".{name}.{last_domain}.", "."))
    return out + [b for b in branches if b not in out]


@dataclass
class LoadReport:
    source: str
    matched: list[str] = field(default_factory=list)  # model keys that received a tensor
    missing: list[str] = field(default_factory=list)  # model keys left as they were
    discarded: list[str] = field(default_factory=list)  # file keys not used (unknown name or other shape)
    notes: list[str] = field(default_factory=list)  # how the loaded model may differ from the file's own

    def summary(self) -> str:
        def names(keys: list[str]) -> str:
            shown = ", ".join(keys[:4])
            return shown + (f", … (+{len(keys) - 4})" if len(keys) > 4 else "")

        text = f"loaded {len(self.matched)} tensors from {self.source}"
        if self.missing:
            text += f"; {len(self.missing)} missing: {names(self.missing)}"
        if self.discarded:
            text += f"; {len(self.discarded)} discarded: {names(self.discarded)}"
        for note in self.notes:
            text += f"; note: {note}"
        return text


def load_state_dict_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                         domain: int | None = None) -> LoadReport:
    """Copy every tensor whose (re-spelled) name and shape fit. The backbone must be complete: a file that leaves
    any backbone tensor missing or of another shape is refused. The head (embedding, BNNeck, classifiers) may be
    absent or differ, as other toolkits' heads and ImageNet classifiers do. Domain-specific BatchNorm loaded into
    plain BatchNorm takes branch `domain` (default: the last one, the target by the other toolkits' convention)."""
    own = model.state_dict()
    report = LoadReport(source)
    accepted: dict[str, torch.Tensor] = {}
    tensors, report.discarded = _strip_wrappers(state_dict)
    arch = getattr(model, "arch", type(model).__name__)
    if _fastreid_reduction_head(tensors):
        # fast-reid 0.x's ReductionHead: pooled -> 1×1 conv -> BN -> LeakyReLU -> (dropout) -> BNNeck; kdreid's head
        # has no BN and activation between its embedding and BNNeck, and its features are that chain's output.
        raise ModelError(
            f"{source}: fast-reid's ReductionHead (heads.bottleneck: 1×1 conv, BN and LeakyReLU before heads.bnneck), "
            f"which {arch}'s head (embedding, BNNeck) does not have; its features would be another model's; use it "
            "in its own toolkit"
        )
    last_domain = str(domain) if domain is not None else _last_domain(tensors)
    for key, (original, value) in tensors.items():
        target = next((k for k in _candidates(key, last_domain) if k in own), None)
        if target is None or own[target].shape != value.shape or target in accepted:
            report.discarded.append(original)
            continue
        accepted[target] = value
    embedding = next((value for key, (_, value) in tensors.items()
                      if "embed.weight" in _candidates(key, last_domain) and value.ndim == 2), None)
    if embedding is not None and ("embed.weight" not in own or own["embed.weight"].shape != embedding.shape):
        # Dropping it would feed the pooled feature to a BNNeck whose statistics were learnt after the layer.
        built = "was built without" if "embed.weight" not in own else \
            f"was built with another one ({own['embed.weight'].shape[1]} -> {own['embed.weight'].shape[0]})"
        raise ModelError(
            f"{source}: holds an embedding layer ({embedding.shape[1]} -> {embedding.shape[0]}) that this {arch} "
            f"{built}; build it with embedding_dim={embedding.shape[0]}"
        )
    pooling = next(((original, value) for key, (original, value) in tensors.items()
                    if re.search(r"pool\w*\.p$", key, re.IGNORECASE) and value.numel() == 1), None)
    if pooling is not None:
        # fast-reid's GeneralizedMeanPoolingP (the SBS configs' POOL_LAYER) learns its exponent p; kdreid pools by
        # average, so its features from these weights would be another model's.
        raise ModelError(
            f"{source}: pools with generalized-mean pooling ({pooling[0]} = {float(pooling[1]):.3g}, fast-reid's "
            f"GeneralizedMeanPoolingP) where {arch} pools by average: its features would be another model's; "
            "use it in its own toolkit, or train it with average pooling (fast-reid: MODEL.HEADS.POOL_LAYER "
            "GlobalAvgPool)"
        )
    if not any(not head_key(k) for k in accepted):
        if str(arch).startswith("mobilenetv2") and any(k.startswith("conv9.conv.") for k in tensors):
            # Same name, another network: torchreid's MobileNetV2 has an extra 1×1 conv in its first block and
            # rounds widths differently; ours is torchvision's.
            raise ModelError(
                f"{source}: a MobileNetV2 in torchreid's layout (conv1..conv9), which kdreid's {arch} "
                "(torchvision's layout and widths) cannot read; use it in torchreid, or train one with kdreid "
                "(mobilenetv2_x1_0 starts from torchvision's ImageNet weights with --pretrained imagenet)"
            )
        raise ModelError(
            f"{source}: none of its {len(state_dict)} tensors fit {arch}'s backbone "
            f"(its keys look like {', '.join(list(state_dict)[:3])}); is it another architecture?"
        )
    report.matched = list(accepted)
    report.missing = [k for k in own if k not in accepted and not k.endswith("num_batches_tracked")]
    backbone = [k for k in own if not head_key(k) and not k.endswith("num_batches_tracked")]
    backbone_missing = [k for k in report.missing if not head_key(k)]
    ibn = next((original for key, (original, _) in tensors.items() if re.search(r"\.IN\.(weight|bias)$", key)), None)
    if ibn is not None:
        # IBN-Net: instance norm on half of the channels of the first BN of each block (IBN-a); kdreid has no such
        # layer, and no other -a would read it.
        raise ModelError(
            f"{source}: an IBN-Net model (instance normalisation, e.g. {ibn}: fast-reid's MODEL.BACKBONE.WITH_IBN, "
            f"torchreid's resnet50_ibn_a), which kdreid's {arch} does not have and no kdreid architecture reads; "
            "use it in its own toolkit, or train one without IBN"
        )
    if backbone_missing and str(arch).startswith("osnet") and all(k.startswith("fc.") for k in backbone_missing):
        # fast-reid's OSNet ends at conv5 (its head pools that map); kdreid's is torchreid's, whose feature is the
        # output of a 512-d `fc` after the pooling: without it the file is another network, not a partial one.
        raise ModelError(
            f"{source}: an OSNet without the fc layer after the pooling (fast-reid's OSNet, whose head pools conv5 "
            f"directly); kdreid's {arch} is torchreid's OSNet, whose feature is that fc's output, and no kdreid "
            "architecture reads it; use it in its own toolkit"
        )
    if backbone_missing:
        # A partly loaded backbone still runs and gives numbers, silently wrong ones: refuse it.
        raise ModelError(
            f"{source}: {len(backbone_missing)} of {arch}'s {len(backbone)} backbone tensors are missing or of "
            f"another shape (e.g. {backbone_missing[0]}); is this a checkpoint of another architecture? "
            "pass the right -a"
        )
    extra = _unplaced_backbone_tensors(tensors, own, last_domain)
    if extra:
        # Layers inside the file's backbone that this one lacks (fast-reid's non-local blocks, SE layers): its
        # features are computed through them; dropping them would give another model's, silently.
        what = ("fast-reid's non-local blocks (MODEL.BACKBONE.WITH_NL)" if any(".NL_" in k or k.startswith("NL_")
                                                                              for k in extra) else
                "squeeze-and-excitation layers (fast-reid's MODEL.BACKBONE.WITH_SE)" if any(".se." in k for k in extra)
                else "layers")
        raise ModelError(
            f"{source}: its backbone holds {len(extra)} tensor{'s' * (len(extra) > 1)} that {arch} has no place "
            f"for (e.g. {extra[0]}: "
            f"{what}); its features are computed through them, so {arch} would give another model's; use it in its "
            "own toolkit, or train one without them"
        )
    fc_layer = next((value for key, (_, value) in tensors.items() if value.ndim == 2
                     and any(re.fullmatch(r"fc\.\d+\.weight", k) for k in _candidates(key, last_domain))
                     and not any(k in own for k in _candidates(key, last_domain))), None)
    if fc_layer is not None:
        # torchreid's `fc_dims` layers (Linear + BN + ReLU after the pooling, e.g. resnet50_fc512): its feature is
        # their output; dropping them would evaluate the pooled feature instead, silently another model. (Checked
        # once the backbone fits: an OSNet file, into another architecture, has an `fc` too.)
        raise ModelError(
            f"{source}: holds fully connected layers after the pooling (fc: {fc_layer.shape[1]} -> "
            f"{fc_layer.shape[0]}, torchreid's fc_dims, e.g. resnet50_fc512) that {arch} does not have; its "
            f"features are their output. To use the {fc_layer.shape[1]}-d pooled feature anyway, re-save the "
            "state dict without its fc.* keys"
        )
    stem = getattr(model, "maxpool", None)
    # (On the keys as the file spells them: an embedding head alone, `heads.bottleneck.0/1`, is renamed by now.)
    stripped = [_without_wrappers(original) for original, _ in tensors.values()]
    if isinstance(stem, nn.MaxPool2d) and stem.padding == 1 and hasattr(model, "layer4") and \
            any(k.startswith("heads.") for k in stripped) and \
            any(k.startswith("backbone.") for k in stripped):
        # A fast-reid file: its ResNet's stem is MaxPool2d(3, 2, ceil_mode=True) with no padding, ours (torchvision's,
        # torchreid's) pads by 1: the pooling windows are one pixel apart, the weights the same.
        report.notes.append("fast-reid's ResNet max-pools its stem without padding, kdreid's as torchvision's: "
                            "features are close to fast-reid's, not equal")
    model.load_state_dict(accepted, strict=False)
    log.info(report.summary())
    return report


def _unplaced_backbone_tensors(tensors: Mapping[str, tuple[str, torch.Tensor]], own: Mapping[str, torch.Tensor],
                               last_domain: str | None) -> list[str]:
    """Original keys of the file's backbone tensors that have no name in `own`: under a backbone module of the model
    (`layer1.0.se.…`), or under a `backbone.` prefix (fast-reid, OpenUnReID: `backbone.NL_2.…`). Other domains'
    BatchNorm branches and heads (classifiers, ImageNet `fc`) are left out: dropping those is expected."""
    backbone_modules = {k.split(".", 1)[0] for k in own if not head_key(k)}
    extra = []
    for key, (original, _) in tensors.items():
        candidates = _candidates(key, last_domain)
        if any(k in own for k in candidates) or key.endswith("num_batches_tracked") or \
                re.search(r"\.(BN_S|BN_T|dsbn\.\d+|bns\.\d+)\.", key):
            continue
        # fast-reid's non-local blocks are top-level modules of its ResNet (`NL_2.0.…` in a backbone saved alone)
        if key.startswith("backbone.") or re.match(r"NL_\d+\.", key) or \
                any(k.split(".", 1)[0] in backbone_modules and "." in k for k in candidates):
            extra.append(original)
    return extra


def load_weights(model: nn.Module, path: str | Path, source: str | None = None) -> LoadReport:
    """Load a file (state dict of any supported toolkit, or a kdreid checkpoint) into `model`."""
    obj = read_file(path)
    label = f"{source} weights {path}" if source else str(path)
    domain = None
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        arch = getattr(model, "arch", None)
        if arch and obj.get("arch") != arch:
            raise CheckpointError(f"{path}: a kdreid checkpoint of {obj.get('arch')}, not of {arch}")
        domain = obj.get("default_domain")  # the branch the checkpoint itself evaluates with
    return load_state_dict_into(model, unwrap_state_dict(obj, str(path)), label, domain)


# ------------------------------------------------------------------------------------------------ ImageNet files
def torch_home() -> Path:
    """$TORCH_HOME (torch.hub.get_dir() is $TORCH_HOME/hub)."""
    return Path(torch.hub.get_dir()).parent


_OR_A_FILE = "pass --pretrained PATH (a state dict in its layout; pretrained=PATH in Python) or --pretrained none"


def resolve_imagenet(spec, otherwise: str = _OR_A_FILE) -> Path:
    """The local ImageNet file for a registered model, or one line saying where to put which file, or what to do
    `otherwise` (a command that takes no weights file names its own way out)."""
    if not spec.imagenet:
        raise ModelError(f"no ImageNet weights are published for {spec.name} in a layout kdreid reads; {otherwise}")
    home = torch_home()
    for name in spec.imagenet:
        for folder in spec.torch_home_dirs:
            candidate = home / folder / name
            if candidate.is_file():
                return candidate
    target = home / spec.torch_home_dirs[0]
    howto = spec.imagenet_howto.replace("<file>", spec.imagenet[0])
    if howto.startswith("torchvision."):
        howto = f"on a connected machine run `python -c \"import torchvision; {howto}\"` and copy it from there"
    raise ModelError(
        f"ImageNet weights for {spec.name} not found: put {spec.imagenet[0]} in {target}/ "
        f"(kdreid never downloads; {howto}), or {otherwise}"
    )


def embedding_dim_for(pretrained: str | Path | None) -> int:
    """`build_model`'s `embedding_dim` for a `pretrained` setting: the width of the embedding layer a weights file
    holds, 0 for none / imagenet (any case) and for a path that is not a file (build_model names it)."""
    if pretrained is None or str(pretrained).lower() in ("", "none", "imagenet") or not Path(pretrained).is_file():
        return 0
    return embedding_dim_of(pretrained)


def embedding_dim_of(path: str | Path) -> int:
    """The width of the embedding layer a weights file holds (0 without one): what `build_model`'s
    `embedding_dim` must be for the file to load whole."""
    tensors, _ = _strip_wrappers(unwrap_state_dict(read_file(path), str(path)))
    last_domain = _last_domain(tensors)
    return next((int(value.shape[0]) for key, (_, value) in tensors.items()
                 if "embed.weight" in _candidates(key, last_domain) and value.ndim == 2), 0)
