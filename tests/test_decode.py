"""metamap.data.decode: one guarded decode for image files and encoded bytes alike."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from metamap.data.decode import MAX_PIXELS, decode_image
from metamap.data.images import ImageSpec
from metamap.errors import DataError


def encoded(image: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def test_bytes_and_file_give_the_same_array(tmp_path):
    pixels = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    data = encoded(Image.fromarray(pixels))
    (tmp_path / "a.png").write_bytes(data)
    spec = ImageSpec(size=8)
    from_bytes = decode_image(data, spec.prepare, "archive.zip: a.png")
    assert np.array_equal(from_bytes, decode_image(tmp_path / "a.png", spec.prepare))
    assert np.array_equal(from_bytes, spec.load(tmp_path / "a.png")) and from_bytes.shape == (1, 8, 8)


def test_encoded_bytes_are_turned_upright_by_exif():
    pixels = np.zeros((4, 6), np.uint8)
    pixels[0, 0] = 255                                   # top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6                                     # stored rotated: show it turned 90 degrees clockwise
    raw = decode_image(encoded(Image.fromarray(pixels)), np.asarray)
    turned = decode_image(encoded(Image.fromarray(pixels), exif=exif), np.asarray)
    assert raw.shape == (4, 6) and turned.shape == (6, 4)
    assert turned[0, -1] == 255 and turned.sum() == 255


def test_bad_bytes_name_the_member_and_the_fix():
    spec = ImageSpec(size=8)
    with pytest.raises(DataError, match=r"^a.zip: x.png: cannot read this image \(UnidentifiedImageError: .*\); "
                                        "delete the archive$"):
        decode_image(b"not an image", spec.prepare, "a.zip: x.png", "delete the archive")
    with pytest.raises(DataError, match=r"^a.zip: y.png: the image is empty; delete the archive$"):
        decode_image(b"", spec.prepare, "a.zip: y.png", "delete the archive")
    noise = np.random.default_rng(0).integers(0, 256, (30, 30), dtype=np.uint8)
    cut = encoded(Image.fromarray(noise))[:200]                    # of about 1,000 bytes
    with pytest.raises(DataError, match=r"^a.zip: z.png: cannot read this image"):
        decode_image(cut, spec.prepare, "a.zip: z.png", "delete the archive")


def test_oversized_bytes_are_refused_from_the_header():
    side = int(MAX_PIXELS ** 0.5) + 100
    data = encoded(Image.new("1", (side, side)))        # small as 1-bit PNG, huge when decoded
    calls = []

    def prepare(image):
        calls.append(1)
        return np.zeros(1)
    with pytest.raises(DataError, match=f"member.png: {side}x{side} pixels is larger than the 64,000,000-pixel"):
        decode_image(data, prepare, "member.png")
    assert not calls
