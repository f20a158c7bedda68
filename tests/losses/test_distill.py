"""The distillation losses against element-by-element transcriptions of their formulas."""

import math

import pytest
import torch
from scipy.stats import truncnorm

from kdreid.losses.distill import bn_margins, cosine_distance_matrix, distance_kd, margin_feature_loss


def test_cosine_distance_matrix_is_one_minus_cosine_pair_by_pair():
    torch.manual_seed(0)
    e = torch.randn(5, 7)
    d = cosine_distance_matrix(e)
    for i in range(5):
        for j in range(5):
            cos = (e[i] @ e[j]) / (e[i].norm() * e[j].norm())
            assert d[i, j].item() == pytest.approx(1 - cos.item(), abs=1e-6)


def test_distance_kd_is_the_frobenius_norm_of_the_difference_of_distance_matrices():
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 8), torch.randn(6, 32)  # widths differ: only distances are compared
    expected = 0.0
    for i in range(6):
        for j in range(6):
            ds = 1 - torch.cosine_similarity(student[i], student[j], dim=0)
            dt = 1 - torch.cosine_similarity(teacher[i], teacher[j], dim=0)
            expected += (ds - dt).item() ** 2
    assert distance_kd(student, teacher).item() == pytest.approx(math.sqrt(expected), rel=1e-5)


def test_distance_kd_moves_only_the_student_and_is_invariant_to_scale():
    torch.manual_seed(2)
    student = torch.randn(4, 8, requires_grad=True)
    teacher = torch.randn(4, 16, requires_grad=True)
    loss = distance_kd(student, teacher)
    loss.backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    assert distance_kd(3 * student.detach(), teacher.detach()).item() == pytest.approx(loss.item(), rel=1e-5)


def test_distance_kd_of_identical_geometry_is_zero_with_finite_gradients():
    torch.manual_seed(3)
    student = torch.randn(4, 8, requires_grad=True)
    loss = distance_kd(student, 2 * student.detach())
    loss.backward()
    assert loss.item() < 1e-5 and torch.isfinite(student.grad).all()


def test_bn_margins_are_the_mean_of_the_negative_part_of_the_bn_output():
    weight = torch.tensor([1.0, -2.0, 0.5, 1.0, 1.0])
    bias = torch.tensor([0.0, 1.0, -0.3, 2.0, 4.0])  # the last: Φ(−4) < 0.001, the fallback −3|γ|
    margins = bn_margins(weight, bias)
    for c in range(4):
        std, mean = abs(weight[c].item()), bias[c].item()
        # E[x | x < 0] for x ~ N(mean, std²), from scipy's truncated normal: an independent reference.
        expected = truncnorm.mean(-math.inf, (0 - mean) / std, loc=mean, scale=std)
        assert margins[c].item() == pytest.approx(expected, rel=1e-5)
        assert margins[c].item() < 0
    assert margins[4].item() == pytest.approx(-3.0)


def _margin_loss_by_hand(students, teachers, margins):
    stages, batch = len(students), students[0].shape[0]
    total = 0.0
    for j, (s, t, m) in enumerate(zip(students, teachers, margins)):
        weight = 1 / 2 ** (stages - 1 - j)
        for n, c, h, w in torch.cartesian_prod(*(torch.arange(k) for k in s.shape)).tolist():
            tv = max(t[n, c, h, w].item(), m[c].item())
            sv = s[n, c, h, w].item()
            if sv > tv or tv > 0:
                total += weight * (sv - tv) ** 2
    return total / batch


def test_margin_feature_loss_matches_its_formula_element_by_element():
    torch.manual_seed(4)
    shapes = [(2, 3, 4, 2), (2, 4, 2, 2), (2, 5, 2, 1), (2, 5, 2, 1)]
    students = [torch.randn(s) for s in shapes]
    teachers = [torch.randn(s) for s in shapes]
    margins = [-torch.rand(s[1]) for s in shapes]
    expected = _margin_loss_by_hand(students, teachers, margins)
    assert margin_feature_loss(students, teachers, margins).item() == pytest.approx(expected, rel=1e-5)


def test_margin_feature_loss_ignores_a_student_below_a_negative_teacher():
    margin = [torch.tensor([-1.0])]
    teacher = [torch.full((1, 1, 1, 2), -0.5)]
    below = [torch.tensor([[[[-0.7, -3.0]]]])]  # both below the (negative) teacher: nothing to learn
    assert margin_feature_loss(below, teacher, margin).item() == 0.0
    above = [torch.tensor([[[[-0.2, -3.0]]]])]  # the first exceeds it: (−0.2 − (−0.5))² counted
    assert margin_feature_loss(above, teacher, margin).item() == pytest.approx(0.09, rel=1e-5)
    # A teacher under its margin is lifted to it: t̂ = max(−5, −1) = −1, and a student at 0 pays (0 − (−1))².
    low_teacher = [torch.full((1, 1, 1, 1), -5.0)]
    assert margin_feature_loss([torch.zeros(1, 1, 1, 1)], low_teacher, margin).item() == pytest.approx(1.0)


def test_margin_feature_loss_weighs_deeper_stages_more_and_divides_by_the_batch():
    ones = [torch.ones(2, 1, 1, 1) for _ in range(4)]
    zeros = [torch.zeros(2, 1, 1, 1) for _ in range(4)]
    margins = [torch.tensor([-1.0]) for _ in range(4)]
    # Per stage: 2 elements of (1 − 0)², weights 1/8 + 1/4 + 1/2 + 1, divided by the batch of 2.
    assert margin_feature_loss(ones, zeros, margins).item() == pytest.approx(1 / 8 + 1 / 4 + 1 / 2 + 1)
    with pytest.raises(ValueError, match="stage counts differ"):
        margin_feature_loss(ones[:3], zeros, margins)
