"""Feature-map projectors for distillation: a student's stage maps mapped to its teacher's widths.

Heo et al. ("A Comprehensive Overhaul of Feature Distillation", ICCV 2019) put a 1×1 conv + BN "connector"
on each student stage so that the student's pre-activation map can be compared element-wise with the
teacher's. The projector is trained with the student and thrown away afterwards.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FeatureProjector(nn.Module):
    """One 1×1 conv (no bias) + BatchNorm per stage, from `student_channels[j]` to `teacher_channels[j]`."""

    def __init__(self, student_channels, teacher_channels):
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ValueError(f"stage counts differ: {len(student_channels)} vs {len(teacher_channels)}")
        self.student_channels = tuple(student_channels)
        self.teacher_channels = tuple(teacher_channels)
        self.stages = nn.ModuleList()
        for c_in, c_out in zip(student_channels, teacher_channels):
            conv = nn.Conv2d(c_in, c_out, 1, bias=False)
            # He-normal on the fan-out (1·1·c_out), as Heo et al.'s connectors.
            nn.init.normal_(conv.weight, std=math.sqrt(2.0 / c_out))
            bn = nn.BatchNorm2d(c_out)
            self.stages.append(nn.Sequential(conv, bn))

    def forward(self, student_maps, teacher_maps=None) -> list[torch.Tensor]:
        """student_maps[j]: (N, Cs_j, H, W) -> (N, Ct_j, H, W). When `teacher_maps` is given and a spatial
        size differs (e.g. a teacher with last stride 2), the projected map is average-pooled or bilinearly
        resized to the teacher's size."""
        projected = [stage(m) for stage, m in zip(self.stages, student_maps)]
        if teacher_maps is not None:
            for j, (p, t) in enumerate(zip(projected, teacher_maps)):
                if p.shape[-2:] != t.shape[-2:]:
                    if p.shape[-2] >= t.shape[-2] and p.shape[-1] >= t.shape[-1]:
                        projected[j] = F.adaptive_avg_pool2d(p, t.shape[-2:])
                    else:
                        projected[j] = F.interpolate(p, size=t.shape[-2:], mode="bilinear", align_corners=False)
        return projected


def build_projector(student: nn.Module, teacher: nn.Module) -> FeatureProjector:
    """Projector from a student model's `stage_channels` to a teacher's."""
    return FeatureProjector(student.stage_channels, teacher.stage_channels)
