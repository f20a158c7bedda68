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
