import torch
import torch.nn.functional as F

from kdreid.data.augment import IMAGENET_MEAN, AugmentConfig, augment_batch


def _images(batch=64, height=32, width=16):
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, 256, (batch, 3, height, width), generator=g, dtype=torch.uint8)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_no_augmentation_only_scales():
    images = _images()
    out = augment_batch(images, AugmentConfig(flip=0, pad=0, erase=0), _gen())
    assert out.dtype == torch.float32 and torch.equal(out, images.float() / 255)


def test_flip_rate_and_exactness():
    images = _images(batch=2000, height=4, width=4)
    out = augment_batch(images, AugmentConfig(flip=0.5, pad=0, erase=0), _gen())
    base = images.float() / 255
    flipped = (out == base.flip(-1)).flatten(1).all(1)
    kept = (out == base).flatten(1).all(1)
    assert bool((flipped | kept).all())
    assert 0.45 < flipped.float().mean() < 0.55


def test_pad_and_crop_is_a_window_of_the_padded_image_with_uniform_offsets():
    images = _images(batch=400, height=8, width=6)
    pad = 2
    out = augment_batch(images, AugmentConfig(flip=0, pad=pad, erase=0), _gen(1))
    padded = F.pad(images.float() / 255, (pad,) * 4)
    offsets = []
    for i in range(len(images)):
        found = [
            (t, l)
            for t in range(2 * pad + 1)
            for l in range(2 * pad + 1)
            if torch.equal(padded[i, :, t : t + 8, l : l + 6], out[i])
        ]
        assert found, f"sample {i} is not a crop of its padded image"
        offsets.append(found[0])
    tops = torch.tensor([t for t, _ in offsets])
    assert set(tops.tolist()) == set(range(2 * pad + 1))
    assert (tops.bincount().float() / len(tops) - 0.2).abs().max() < 0.07


def test_random_erasing_fills_a_rectangle_with_the_mean():
    images = torch.full((1000, 3, 32, 16), 255, dtype=torch.uint8)
    out = augment_batch(images, AugmentConfig(flip=0, pad=0, erase=0.5), _gen(2))
    erased = (out[:, 0] != 1.0)  # (B, H, W)
    fraction = erased.flatten(1).float().mean(1)
    applied = fraction > 0
    assert 0.4 < applied.float().mean() < 0.6
    assert fraction[applied].min() >= 0.01 and fraction[applied].max() <= 0.45
    for c, mean in enumerate(IMAGENET_MEAN):
        assert torch.allclose(out[:, c][erased], torch.tensor(mean))
    # The erased region is one rectangle: its rows and columns span exactly its area.
    for i in torch.nonzero(applied).flatten()[:50].tolist():
        rows, cols = erased[i].any(1).sum(), erased[i].any(0).sum()
        assert rows * cols == erased[i].sum()


def test_same_generator_seed_same_batch():
    images = _images()
    config = AugmentConfig()
    assert torch.equal(augment_batch(images, config, _gen(7)), augment_batch(images, config, _gen(7)))
    assert not torch.equal(augment_batch(images, config, _gen(7)), augment_batch(images, config, _gen(8)))
