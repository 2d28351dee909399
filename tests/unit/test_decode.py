import io

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import IMAGE_CORRUPT, IMAGE_MISSING, IMAGE_OK, IMAGE_TOO_LARGE, build_item_text, check_image_bytes, decode_image


@pytest.fixture(scope="module")
def poster(raw_data_dir) -> bytes:
    return (raw_data_dir / "images" / "1.jpg").read_bytes()


def test_real_poster_decodes_to_rgb_square(poster):
    decoded = decode_image(poster, 48)
    assert decoded.status == IMAGE_OK
    assert decoded.pixels.shape == (3, 48, 48) and decoded.pixels.dtype == np.uint8
    assert decoded.pixels.std() > 10  # a real picture, not a blank


def test_decode_matches_plain_pillow_resize(poster):
    # draft mode may decode at a reduced scale first; the result must stay close to a full decode + resize
    reference = np.asarray(Image.open(io.BytesIO(poster)).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    decoded = decode_image(poster, 64).pixels.transpose(1, 2, 0).astype(float)
    assert np.abs(decoded - reference).mean() < 12


@pytest.mark.parametrize(
    "data, status",
    [(None, IMAGE_MISSING), (b"", IMAGE_MISSING), (b"not an image at all", IMAGE_CORRUPT)],
)
def test_bad_bytes_give_status_and_zeros(data, status):
    decoded = decode_image(data, 16)
    assert decoded.status == status
    assert decoded.pixels.shape == (3, 16, 16) and not decoded.pixels.any()


def test_truncated_jpeg_is_corrupt(poster):
    assert check_image_bytes(poster[: len(poster) // 3], 10**8) == IMAGE_CORRUPT
    assert decode_image(poster[: len(poster) // 3], 16).status == IMAGE_CORRUPT
    assert check_image_bytes(poster, 10**8) == IMAGE_OK


def test_oversized_image_is_refused(poster):
    assert check_image_bytes(poster, max_pixels=100) == IMAGE_TOO_LARGE
    assert decode_image(poster, 16, max_pixels=100).status == IMAGE_TOO_LARGE


def test_item_text_joins_fields_and_lists():
    row = {"title": "Toy Story (1995)", "genres": "Animation|Children's|Comedy", "description": "  A  cowboy doll. "}
    text = build_item_text(row, ("title", "genres", "description"))
    assert text == "Toy Story (1995). Animation, Children's, Comedy. A cowboy doll."
    assert build_item_text({"title": float("nan"), "genres": ""}, ("title", "genres")) == ""
