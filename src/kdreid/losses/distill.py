"""Distillation losses of KD-ReID (Remigereau et al.): pure functions of tensors.

- `distance_kd`: the student's batch geometry matched to the teacher's, ‖D(student) − D(teacher)‖_F with D the
  cosine-distance matrix of the batch's embeddings (the original's `LogEuclidLoss(log=False)`). It compares
  distances, not coordinates, so the two embeddings may have different widths.
- `margin_feature_loss`: Heo et al., "A Comprehensive Overhaul of Feature Distillation" (ICCV 2019), on each
  stage's pre-activation maps: the teacher map is clamped from below at a per-channel margin (`bn_margins`,
  the expected value of the negative pre-activations), and the squared error is counted only where the student
  exceeds the teacher or the teacher is positive ("partial L2": negative teacher values all mean "off" after
  the ReLU, so a student below them is not penalised).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def cosine_distance_matrix(embeddings: torch.Tensor) -> torch.Tensor:
    """1 − cos(e_i, e_j). embeddings (B, D) -> (B, B), float32."""
    normalized = F.normalize(embeddings.float(), dim=1)
    return 1.0 - normalized @ normalized.t()


def distance_kd(student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> torch.Tensor:
    """L_kd = ‖D(student) − D(teacher)‖_F: Frobenius norm, not squared, not averaged (as the original).
    student (B, Ds), teacher (B, Dt), the same B images -> scalar. float32 even under autocast."""
    if len(student_embeddings) != len(teacher_embeddings):
        raise ValueError(f"batch sizes differ: {len(student_embeddings)} vs {len(teacher_embeddings)}")
    with torch.autocast(student_embeddings.device.type, enabled=False):
        difference = cosine_distance_matrix(student_embeddings) - cosine_distance_matrix(teacher_embeddings.detach())
        # sqrt of the sum of squares, with a floor so that identical geometries (difference 0) give a zero
        # gradient instead of 0/0.
        return difference.pow(2).sum().clamp_min(1e-12).sqrt()


def bn_margins(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Heo et al.'s margin per channel: E[x | x < 0] for x ~ N(β, γ²), the distribution a BatchNorm with
    weight γ and bias β gives its output, i.e. β − |γ|·φ(β/|γ|) / Φ(−β/|γ|). Where Φ(−β/|γ|) ≤ 0.001 (almost
    no negative values) the estimate is unstable and −3|γ| is used, as in their code. (C,), (C,) -> (C,)."""
    std = weight.detach().float().abs().clamp_min(1e-12)
    mean = bias.detach().float()
    ratio = mean / std
    cdf = 0.5 * (1.0 + torch.erf(-ratio / math.sqrt(2.0)))  # Φ(−β/|γ|)
    density = torch.exp(-0.5 * ratio.pow(2)) / math.sqrt(2.0 * math.pi)  # φ(β/|γ|)
    margin = mean - std * density / cdf.clamp_min(1e-12)
    return torch.where(cdf > 1e-3, margin, -3.0 * std)


def margin_feature_loss(
    student_maps: Sequence[torch.Tensor],
    teacher_maps: Sequence[torch.Tensor],
    margins: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Σ_j w_j Σ (s − t̂)² · 1[s > t̂ or t̂ > 0] / B, with t̂ = max(t, margin_j) per channel and w_j = 1/2^(N−1−j)
    (deeper stages weigh more: 1/8, 1/4, 1/2, 1 for N = 4).

    student_maps[j]: (B, C_j, H_j, W_j), already projected to the teacher's width and size;
    teacher_maps[j]: the same shape; margins[j]: (C_j,). float32 even under autocast."""
    if not (len(student_maps) == len(teacher_maps) == len(margins)):
        raise ValueError(f"stage counts differ: {len(student_maps)}, {len(teacher_maps)}, {len(margins)}")
    stages = len(student_maps)
    batch = student_maps[0].shape[0]
    total = student_maps[0].new_zeros((), dtype=torch.float32)
    with torch.autocast(student_maps[0].device.type, enabled=False):
        for j, (student, teacher, margin) in enumerate(zip(student_maps, teacher_maps, margins)):
            if student.shape != teacher.shape:
                raise ValueError(f"stage {j}: student map {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
            student = student.float()
            teacher = torch.maximum(teacher.detach().float(), margin.float().view(1, -1, 1, 1))
            counted = (student > teacher) | (teacher > 0)
            squared = (student - teacher).pow(2) * counted
            total = total + squared.sum() / 2 ** (stages - 1 - j)
    return total / batch
