from __future__ import annotations

import torch

from kdreid.models import FeatureProjector, build_model, build_projector


def test_projects_student_maps_to_teacher_widths():
    student = build_model("osnet_tiny", 3)
    teacher = build_model("resnet_tiny", 3)
    projector = build_projector(student, teacher)
    assert projector.student_channels == (64, 64, 64, 64) and projector.teacher_channels == (8, 16, 32, 64)
    images = torch.rand(2, 3, 64, 32)
    student_maps = student(images).feature_maps
    teacher_maps = teacher(images).feature_maps
    projected = projector(student_maps)
    assert [p.shape for p in projected] == [t.shape for t in teacher_maps]
    # each stage is a 1×1 conv then BN (train mode: per-channel batch statistics are standardised)
    conv, bn = projector.stages[0]
    direct = torch.nn.functional.conv2d(student_maps[0], conv.weight)
    mean = direct.mean(dim=(0, 2, 3), keepdim=True)
    var = direct.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    assert torch.allclose(projected[0], (direct - mean) / torch.sqrt(var + bn.eps), atol=1e-4)
    sum(p.sum() for p in projected).backward()
    assert conv.weight.grad is not None


def test_resizes_to_the_teachers_map_when_sizes_differ():
    projector = FeatureProjector((4, 4, 4, 4), (6, 6, 6, 6))
    student = [torch.rand(2, 4, 16, 8), torch.rand(2, 4, 8, 4), torch.rand(2, 4, 4, 2), torch.rand(2, 4, 4, 2)]
    teacher = [torch.rand(2, 6, 16, 8), torch.rand(2, 6, 8, 4), torch.rand(2, 6, 4, 2), torch.rand(2, 6, 2, 1)]
    out = projector(student, teacher)
    assert [o.shape for o in out] == [t.shape for t in teacher]
    smaller = projector(student, [torch.rand(2, 6, 32, 16)] * 4)
    assert smaller[3].shape == (2, 6, 32, 16)


def test_connectors_start_he_normal_on_the_fan_out_as_heo_et_al():
    torch.manual_seed(0)
    projector = FeatureProjector((64, 64, 64, 64), (256, 512, 1024, 2048))
    for (conv, _), c_out in zip(projector.stages, (256, 512, 1024, 2048)):
        assert abs(conv.weight.std().item() / (2.0 / c_out) ** 0.5 - 1) < 0.05


def test_a_larger_student_map_is_average_pooled_and_a_smaller_one_bilinearly_resized():
    # Found by a review: only the shapes were checked; max pooling or another resize passed.
    torch.manual_seed(0)
    projector = FeatureProjector((4, 4), (6, 6)).eval()
    student = [torch.randn(2, 4, 16, 8), torch.randn(2, 4, 2, 1)]  # 4x larger (bilinear would differ), 2x smaller
    teacher = [torch.zeros(2, 6, 4, 2), torch.zeros(2, 6, 4, 2)]
    with torch.no_grad():
        plain = projector(student)
        out = projector(student, teacher)
    assert torch.allclose(out[0], torch.nn.functional.avg_pool2d(plain[0], 4), atol=1e-6)
    upsampled = torch.nn.functional.interpolate(plain[1], size=(4, 2), mode="bilinear", align_corners=False)
    assert torch.allclose(out[1], upsampled, atol=1e-6)
