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
