"""fastmim.data.jpeg: TurboJPEG decoding into a caller's buffer gives OpenCV's pixels (the reader's previous decoder)
bit for bit, for the JPEG kinds a .beton may hold, and refuses what is not a JPEG."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from fastmim.data.jpeg import Decoder, JpegError
from fastmim.data.sources import DemoSource


def encode(image: Image.Image, **options) -> np.ndarray:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return np.frombuffer(buffer.getvalue(), np.uint8)


def opencv(data: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize(
    "options",
    [{"quality": 90}, {"quality": 75, "subsampling": 0}, {"quality": 95, "subsampling": 1}, {"progressive": True}],
)
def test_decoded_pixels_equal_opencv_bit_for_bit(options):
    decoder, out = Decoder(), np.empty(200 * 200 * 3, np.uint8)
    demo = DemoSource(6, 60)
    for i in range(6):
        image = demo.load(i)[0]
        data = encode(image, **options)
        got = decoder.decode_into(data, out)
        assert got.shape == (image.height, image.width, 3) and np.shares_memory(got, out)
        assert np.array_equal(got, opencv(data))
        assert decoder.size(data) == image.size


def test_grayscale_jpeg_decodes_to_rgb_like_opencv():
    gray = Image.fromarray(np.random.default_rng(0).integers(0, 256, (21, 34), dtype=np.uint8), "L")
    data = encode(gray, quality=90)
    assert np.array_equal(Decoder().decode_into(data, np.empty(21 * 34 * 3, np.uint8)), opencv(data))


def test_truncated_data_is_refused_like_opencv():
    data = encode(DemoSource(1, 64).load(0)[0], quality=90)
    cut = data[: len(data) * 2 // 3]
    assert cv2.imdecode(cut, cv2.IMREAD_COLOR) is None
    with pytest.raises(JpegError):
        Decoder().decode_into(cut, np.empty(256 * 256 * 3, np.uint8))


def test_not_a_jpeg_and_too_small_a_buffer_raise():
    decoder = Decoder()
    with pytest.raises(JpegError):
        decoder.decode_into(np.frombuffer(b"not a jpeg at all", np.uint8), np.empty(100, np.uint8))
    data = encode(Image.new("RGB", (10, 10)), quality=90)
    with pytest.raises(JpegError, match="does not fit"):
        decoder.decode_into(data, np.empty(10 * 10 * 3 - 1, np.uint8))
