"""Re-ID models: backbones (ResNet, OSNet, MobileNetV2), the shared head and forward contract, DSBN,
feature projectors, weight loading and kdreid checkpoints.

    model = build_model("osnet_x0_25", num_classes=751, pretrained="imagenet")
    out = model(images)              # train mode: Out(feature_maps, embedding, logits, neck)
    features = model.eval()(images)  # eval mode: (N, model.embedding_dim)
    save_checkpoint("model.pt", model, config=cfg, datasets=["market1501"], metrics={"mAP": 0.7})
    model = load_checkpoint("model.pt")   # eval mode, CPU, metadata in model.kdreid_meta

See docs/models.md.
"""

from kdreid.models.registry import (
    build_model,
    check_input_size,
    count_macs,
    count_parameters,
    get_spec,
    list_models,
    model_names,
    register_model,
)
from kdreid.models.heads import Out, ReidModel

# Importing each backbone file registers its architectures.
from kdreid.models import resnet  # noqa: E402,F401  (order = the order `kdreid models` lists)
from kdreid.models import osnet  # noqa: E402,F401
from kdreid.models import mobilenet  # noqa: E402,F401
from kdreid.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from kdreid.models.dsbn import DSBatchNorm, convert_dsbn, select_domain, set_domain
from kdreid.models.projectors import FeatureProjector, build_projector
from kdreid.models.weights import LoadReport, load_weights

__all__ = [
    "build_model",
    "check_input_size",
    "list_models",
    "model_names",
    "register_model",
    "get_spec",
    "count_parameters",
    "count_macs",
    "Out",
    "ReidModel",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "DSBatchNorm",
    "convert_dsbn",
    "select_domain",
    "set_domain",
    "FeatureProjector",
    "build_projector",
    "LoadReport",
    "load_weights",
]
