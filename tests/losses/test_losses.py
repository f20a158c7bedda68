"""Each loss against a direct, pair-by-pair transcription of its formula."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from kdreid.losses import (
    DEFAULT_SIGMAS,
    batch_hard_triplet,
    cross_entropy_label_smoothing,
    dmmd_terms,
    euclidean_distances,
    gaussian_kernel,
    mmd,
    within_between,
)


def test_cross_entropy_label_smoothing_formula():
    torch.manual_seed(0)
    logits, labels, eps = torch.randn(5, 7), torch.tensor([0, 3, 6, 3, 1]), 0.1
    log_probs = torch.log_softmax(logits, 1)
    expected = 0.0
    for i in range(5):
        target = torch.full((7,), eps / 7)
        target[labels[i]] += 1 - eps
        expected += -(target * log_probs[i]).sum() / 5
    assert torch.allclose(cross_entropy_label_smoothing(logits, labels, eps), expected, atol=1e-6)


def test_euclidean_distances_match_cdist():
    torch.manual_seed(0)
    a, b = torch.randn(6, 16) * 5, torch.randn(4, 16)
    assert torch.allclose(euclidean_distances(a, b), torch.cdist(a, b), atol=1e-4)


def _triplet_direct(x, labels, margin, soft):
    losses = []
    for i in range(len(x)):
        d = [float((x[i] - x[j]).norm()) for j in range(len(x))]
        pos = [d[j] for j in range(len(x)) if j != i and labels[j] == labels[i]]
        neg = [d[j] for j in range(len(x)) if labels[j] != labels[i]]
        if not pos or not neg:
            continue
        gap = max(pos) - min(neg)
        losses.append(math.log1p(math.exp(gap)) if soft else max(0.0, gap + margin))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("soft", [False, True])
def test_batch_hard_triplet_formula(soft):
    torch.manual_seed(1)
    x = torch.randn(12, 8)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 5])  # 5 is a singleton anchor: left out
    got = batch_hard_triplet(x, labels, margin=0.3, soft_margin=soft)
    assert got.item() == pytest.approx(_triplet_direct(x, labels.tolist(), 0.3, soft), rel=1e-5)


def test_triplet_is_zero_for_well_separated_classes_and_grads_flow():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.1, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    assert batch_hard_triplet(x, labels).item() == 0.0
    y = torch.randn(8, 4, requires_grad=True)
    batch_hard_triplet(y, torch.arange(4).repeat_interleave(2), margin=100.0).backward()
    assert y.grad.abs().sum() > 0


def _kernel_direct(a, b):
    return sum(math.exp(-((a - b) ** 2) / (2 * s)) for s in DEFAULT_SIGMAS)


def test_mmd_on_scalars_matches_direct_sum():
    x, y = [0.5, 1.5, 2.0], [1.0, 3.0, 3.5, 4.0]
    expected = (
        sum(_kernel_direct(a, b) for a in x for b in x) / 9
        + sum(_kernel_direct(a, b) for a in y for b in y) / 16
        - 2 * sum(_kernel_direct(a, b) for a in x for b in y) / 12
    )
    assert mmd(torch.tensor(x), torch.tensor(y)).item() == pytest.approx(expected, rel=1e-5)


def test_mmd_on_vectors_matches_direct_sum():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3), torch.randn(5, 3) + 1

    def k(a, b):
        return sum(math.exp(-float((a - b).pow(2).sum()) / (2 * s)) for s in DEFAULT_SIGMAS)

    expected = (
        sum(k(a, b) for a in x for b in x) / 16 + sum(k(a, b) for a in y for b in y) / 25
        - 2 * sum(k(a, b) for a in x for b in y) / 20
    )
    assert mmd(x, y).item() == pytest.approx(expected, rel=1e-4)
    assert mmd(x, x).item() == pytest.approx(0.0, abs=1e-4)


def _mmd_float64(x, y):
    def kernel(a, b):  # exact differences, no expansion
        squared = (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)
        return sum(torch.exp(-squared / (2 * s)) for s in DEFAULT_SIGMAS)

    x, y = x.double(), y.double()
    return (kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean()).item()


def test_mmd_of_wide_embeddings_keeps_the_exact_kernel_diagonal():
    # 2048-d embeddings of norm ~45, as a ResNet-50's pooled features: in float32 the expansion
    # |x|² + |y|² - 2x·y leaves rounding of ~1e-4 where x_i meets itself, which the narrow bandwidths
    # (1/(2σ) up to 5e5) would turn into a diagonal anywhere between 15.8 and 19.
    torch.manual_seed(0)
    x, y = torch.randn(32, 2048), torch.randn(32, 2048) + 0.05
    assert torch.equal(gaussian_kernel(x, x).diagonal(), torch.full((32,), float(len(DEFAULT_SIGMAS))))
    assert mmd(x, y).item() == pytest.approx(_mmd_float64(x, y), abs=1e-4)
    assert mmd(x, x).item() == pytest.approx(0.0, abs=1e-5)


def test_the_kernel_of_two_equal_embeddings_is_exact_off_the_diagonal_too():
    # Found by a review: only the diagonal was made exact. Two copies of one image (a group smaller than K repeats
    # some), or a collapsed embedding, are equal rows away from the diagonal, where the float32 expansion left
    # ~1e-4 of rounding: the feature term of an all-equal target batch came out up to 12 % low.
    torch.manual_seed(0)
    for width, norm in ((2048, 45.0), (512, 10.0)):  # where the rounding shows depends on the BLAS's blocking
        x = torch.randn(32, width) * norm / math.sqrt(width)
        y = x[:1].repeat(32, 1)  # one embedding 32 times
        for other in (y, y.clone()):
            assert torch.equal(gaussian_kernel(y, other), torch.full((32, 32), float(len(DEFAULT_SIGMAS))))
        assert mmd(x, y).item() == pytest.approx(_mmd_float64(x, y), abs=1e-4)
    copies = torch.cat([x[:16], x[:16]]).requires_grad_(True)
    (grad,) = torch.autograd.grad(mmd(x, copies), copies)
    assert torch.isfinite(grad).all()


def test_within_between_groups_by_label_not_position():
    dist = torch.arange(36, dtype=torch.float32).reshape(6, 6)
    groups = torch.tensor([7, 3, 7, 3, 3, 9])  # interleaved: position says nothing
    within, between = within_between(dist, groups)
    pairs = list(itertools.combinations(range(6), 2))
    assert sorted(within.tolist()) == sorted(float(dist[i, j]) for i, j in pairs if groups[i] == groups[j])
    assert sorted(between.tolist()) == sorted(float(dist[i, j]) for i, j in pairs if groups[i] != groups[j])
    assert len(within) + len(between) == 15  # each unordered pair once, no self-pairs


def test_dmmd_terms_against_pairwise_computation_and_gradients_only_into_target_distances():
    torch.manual_seed(0)
    source = (torch.randn(8, 5) * 3).requires_grad_()
    target = (torch.randn(8, 5) * 2 + 1).requires_grad_()
    source_groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    target_groups = torch.tensor([4, 5, 4, 5, 6, 6, 7, 7])
    terms = dmmd_terms(source, source_groups, target, target_groups)

    def split(x, g):
        within, between = [], []
        for i, j in itertools.combinations(range(len(x)), 2):
            (within if g[i] == g[j] else between).append(float((x[i] - x[j]).norm()))
        return within, between

    def mmd_direct(a, b):
        return (
            sum(_kernel_direct(u, v) for u in a for v in a) / len(a) ** 2
            + sum(_kernel_direct(u, v) for u in b for v in b) / len(b) ** 2
            - 2 * sum(_kernel_direct(u, v) for u in a for v in b) / (len(a) * len(b))
        )

    sw, sb = split(source.detach(), source_groups.tolist())
    tw, tb = split(target.detach(), target_groups.tolist())
    assert terms["mmd_within"].item() == pytest.approx(mmd_direct(sw, tw), rel=1e-4, abs=1e-5)
    assert terms["mmd_between"].item() == pytest.approx(mmd_direct(sb, tb), rel=1e-4, abs=1e-5)

    # The distance terms move only the target: the source distances are detached.
    (terms["mmd_within"] + terms["mmd_between"]).backward()
    assert source.grad is None or source.grad.abs().sum() == 0
    assert target.grad.abs().sum() > 0


def test_the_dmmd_feature_term_is_the_embeddings_mmd_and_moves_both_sides():
    # Found by a review: detaching either side of the feature term passed every test; detaching the target's
    # leaves one of the three D-MMD terms unable to adapt anything.
    torch.manual_seed(1)
    source = (torch.randn(8, 5) * 0.3).requires_grad_()
    target = (torch.randn(8, 5) * 0.3 + 0.2).requires_grad_()
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    terms = dmmd_terms(source, groups, target, groups)
    assert terms["mmd_features"].item() == pytest.approx(_mmd_float64(source.detach(), target.detach()), rel=1e-4)
    terms["mmd_features"].backward()
    assert source.grad.abs().sum() > 0 and target.grad.abs().sum() > 0
    normalized = dmmd_terms(source, groups, target, groups, normalize=True)["mmd_features"]
    assert normalized.item() == pytest.approx(
        _mmd_float64(F.normalize(source.detach(), dim=1), F.normalize(target.detach(), dim=1)), rel=1e-4)


def test_two_copies_of_one_image_are_no_within_class_pair():
    # A group smaller than K repeats images in its chunk (drawn with replacement, as torchreid's sampler does);
    # the copies' distances are no within-class sample (the original code counted them, defect 32).
    torch.manual_seed(0)
    source = torch.randn(8, 5) * 3
    target = torch.randn(8, 5) * 2 + 1
    source_groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    source_images = torch.tensor([10, 11, 12, 13, 20, 21, 22, 23])
    target_groups = torch.tensor([4, 4, 4, 4, 5, 5, 5, 5])
    target_images = torch.tensor([30, 31, 30, 30, 40, 41, 42, 40])  # group 4 has 2 images, group 5 has 3
    target = target.clone()
    for i, j in ((2, 0), (3, 0), (7, 4)):
        target[i] = target[j] + 0.01 * torch.randn(5)  # two augmentations of one image: nearly the same
    terms = dmmd_terms(source, source_groups, target, target_groups, source_images=source_images,
                       target_images=target_images)

    pairs = list(itertools.combinations(range(8), 2))
    target_dist = euclidean_distances(target)
    within = [float(target_dist[i, j]) for i, j in pairs
              if target_groups[i] == target_groups[j] and target_images[i] != target_images[j]]
    assert len(within) == 3 + 5  # of the 12 same-group pairs, 4 are two copies of one image
    source_dist = euclidean_distances(source)
    source_within = [float(source_dist[i, j]) for i, j in pairs if source_groups[i] == source_groups[j]]
    direct = mmd(torch.tensor(source_within), torch.tensor(within))
    assert terms["mmd_within"].item() == pytest.approx(direct.item(), rel=1e-4, abs=1e-6)
    kept, between = within_between(target_dist, target_groups, target_images)
    assert sorted(kept.tolist()) == pytest.approx(sorted(within))
    assert len(between) == 16  # copies change nothing across groups
    # Without the images the copies count: a different (lower-distance) within-class distribution.
    blind = dmmd_terms(source, source_groups, target, target_groups)
    assert blind["mmd_within"].item() != pytest.approx(terms["mmd_within"].item(), rel=1e-2)
    assert blind["mmd_between"].item() == pytest.approx(terms["mmd_between"].item(), rel=1e-6)


def test_distances_and_kernel_stay_float32_under_autocast():
    torch.manual_seed(0)
    x = torch.randn(16, 64) * 10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = euclidean_distances(x)
        kernel = mmd(inside[0], inside[1])
    assert inside.dtype == torch.float32
    assert torch.allclose(inside, euclidean_distances(x), atol=1e-4)
    assert kernel.item() == pytest.approx(mmd(euclidean_distances(x)[0], euclidean_distances(x)[1]).item(), rel=1e-5)


def test_dmmd_terms_under_bf16_autocast_equal_the_float32_ones():
    # The training step runs under bf16 autocast on CUDA: the weighted kernel sums must not run in bf16 there
    # (they rounded mmd_between 0.044 to 0.125 before).
    torch.manual_seed(0)
    source, target = torch.randn(16, 64), torch.randn(16, 64) * 1.3 + 0.2
    source_groups, target_groups = torch.arange(16) // 4, torch.arange(16) // 2
    exact = dmmd_terms(source, source_groups, target, target_groups)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = dmmd_terms(source, source_groups, target, target_groups)
    for name, value in exact.items():
        assert under[name].dtype == torch.float32
        assert under[name].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-7), name


def test_normalised_dmmd_terms_ignore_the_embedding_scale_and_raw_ones_do_not():
    # With fixed kernel bandwidths, scaling the target's embeddings changes the raw terms: training can move
    # the scale instead of the distributions. Normalised, the terms see directions only.
    torch.manual_seed(3)
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    raw, raw_scaled = dmmd_terms(x, groups, y, groups), dmmd_terms(x, groups, 3 * y, groups)
    norm, norm_scaled = (dmmd_terms(x, groups, y, groups, normalize=True),
                         dmmd_terms(x, groups, 3 * y, groups, normalize=True))
    unit = dmmd_terms(F.normalize(x, dim=1), groups, F.normalize(y, dim=1), groups)
    # (rel 1e-2: the narrowest bandwidths magnify float32 rounding of the normalised vectors' distances.)
    for name in norm:
        assert norm_scaled[name].item() == pytest.approx(norm[name].item(), rel=1e-2)
        assert norm[name].item() == pytest.approx(unit[name].item(), rel=1e-2)
        assert abs(raw_scaled[name].item() / raw[name].item() - 1) > 0.5


def test_dmmd_term_is_zero_without_gradient_when_one_side_has_no_pair_of_its_kind():
    # Source groups all different (no within-class pair, as a source batch grouped by tracklet can be): the
    # within term is undefined and must contribute nothing, rather than pull the target's own pairs around.
    torch.manual_seed(2)
    x, y = torch.randn(6, 4), torch.randn(6, 4, requires_grad=True)
    terms = dmmd_terms(x, torch.arange(6), y, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert terms["mmd_within"].item() == 0.0
    (grad,) = torch.autograd.grad(terms["mmd_within"], y)
    assert torch.count_nonzero(grad) == 0
    assert terms["mmd_between"].item() > 0  # the other terms are unaffected


def test_dmmd_terms_stay_finite_when_a_batch_has_one_group_only():
    # Every pair is then a within-class pair: the between-class term has no samples and contributes nothing.
    torch.manual_seed(1)
    x, y = torch.randn(6, 4), torch.randn(6, 4)
    one = torch.zeros(6, dtype=torch.long)
    terms = dmmd_terms(x, one, y, one)
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms["mmd_between"].item() == 0.0 and terms["mmd_within"].item() > 0


def test_a_first_call_in_inference_mode_does_not_break_later_training():
    import importlib

    module = importlib.import_module("kdreid.losses.mmd")  # the module: the package's attribute is the function
    module._WIDTHS.clear()  # the cache is filled by whichever call comes first
    a, b = torch.randn(8, 4), torch.randn(8, 4)
    with torch.inference_mode():
        mmd(a, b)
    x = torch.randn(8, 4, requires_grad=True)
    groups = torch.arange(4).repeat_interleave(2)
    terms = dmmd_terms(a, groups, x, groups)
    sum(terms.values()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
