import numpy as np
import pytest
from PIL import Image

from kdreid.data.cache import decode_images, read_image
from kdreid.errors import DatasetError


def test_decode_images_resizes_and_keeps_order(tmp_path):
    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(np.full((20 + i, 10, 3), 40 * i, dtype=np.uint8)).save(path, quality=100)
        paths.append(str(path))
    cache = decode_images(paths, 16, 8, workers=2)
    assert cache.shape == (5, 3, 16, 8) and cache.dtype.is_floating_point is False
    assert [int(cache[i].float().mean().round()) for i in range(5)] == [0, 40, 80, 120, 160]


def test_truncated_and_missing_images_name_the_file(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.zeros((16, 8, 3), dtype=np.uint8)).save(good)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(good.read_bytes()[:40])
    with pytest.raises(DatasetError, match="broken.jpg cannot be decoded"):
        read_image(str(broken), 16, 8)
    with pytest.raises(DatasetError, match="missing.jpg does not exist"):
        decode_images([str(good), str(tmp_path / "missing.jpg")], 16, 8)


def test_a_16_bit_image_keeps_its_grey_levels(tmp_path):
    # PIL's convert("RGB") clips 16-bit values to white (what torchreid gets); the top 8 bits are the image.
    levels = np.array([[0, 256 * 64, 256 * 128, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(levels).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    pixels = read_image(str(tmp_path / "grey16.png"))
    assert pixels.shape == (4, 4, 3) and pixels[0, :, 0].tolist() == [0, 64, 128, 255]
    assert (pixels == pixels[..., :1]).all()  # grey: three equal channels


def _position_image(height: int, width: int) -> np.ndarray:
    """Pixels that encode where they are (R the row, G the column): a transpose, a flip or a channel swap shows."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([rows * 10, cols * 20, np.full_like(rows, 7)], axis=-1).astype(np.uint8)


def test_the_training_cache_holds_each_image_as_torchvision_reads_it_and_as_evaluation_feeds_it(tmp_path):
    """Found by a review: the only cache test used flat grey images, so an HWC->CHW slip (a reshape for the
    transpose) scrambled every training image unseen, while evaluation, decoded another way, stayed right."""
    import torch
    from torchvision.transforms import ToTensor

    from kdreid.evaluation.features import extract_features

    path = tmp_path / "position.png"
    Image.fromarray(_position_image(16, 8)).save(path)  # lossless, at the size asked: no resampling
    cached = decode_images([str(path)], 16, 8)[0]
    expected = (ToTensor()(Image.open(path).convert("RGB")) * 255).round().to(torch.uint8)  # torchreid's loader
    assert torch.equal(cached, expected)
    seen = []

    class Spy(torch.nn.Module):  # what evaluation feeds a model, as 0..255 again
        def forward(self, images):
            seen.append((images * 255).round().to(torch.uint8))
            return images.flatten(1)[:, :4]

    extract_features(Spy(), [str(path)], height=16, width=8, device="cpu")
    assert torch.equal(seen[0][0], cached)


def test_resizing_is_torchvisions_resize_of_torchreids_loader(tmp_path):
    """Found by a review: a rotated or nearest-neighbour resize kept the mean of a flat image. torchreid resizes
    with torchvision's Resize((height, width)), bilinear on the PIL image."""
    from torchvision.transforms import Resize

    pixels = _position_image(20, 10)
    pixels[:3, :2] = 255  # a bright top-left corner
    path = tmp_path / "gradient.png"
    Image.fromarray(pixels).save(path)
    resized = read_image(str(path), 16, 8)
    assert np.array_equal(resized, np.asarray(Resize((16, 8))(Image.open(path).convert("RGB"))))
    assert resized[:2, :2].mean() > resized[-2:, -2:].mean() + 50  # the corner stayed where it was


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "L", "CMYK"])
def test_images_of_every_mode_decode_to_their_rgb(tmp_path, mode):
    """Found by a review: nothing but RGB, L and 16-bit grey was ever decoded; a custom dataset's PNG or WebP is
    often RGBA or a palette image."""
    rgb = Image.fromarray(_position_image(12, 6))
    path = tmp_path / f"image_{mode}.png" if mode != "CMYK" else tmp_path / "image_cmyk.jpg"
    image = rgb.convert(mode)
    image.save(path, quality=100) if mode == "CMYK" else image.save(path)
    expected = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(read_image(str(path)), expected) and expected.shape == (12, 6, 3)
    assert decode_images([str(path)], 12, 6).shape == (1, 3, 12, 6)
