import pytest
import torch

from fastmim.targets import PixelTarget, pixel_target
from tests.oracles import literal_pixel_target


@pytest.mark.parametrize("cell", [4, 8, 16, 32])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_matches_literal_oracle(cell, norm_pix):
    img = torch.randn(2, 3, 64, 32, dtype=torch.float64)
    torch.testing.assert_close(pixel_target(img, cell, norm_pix), literal_pixel_target(img, cell, norm_pix))


def test_order_row_col_channel():
    img = torch.arange(2 * 2 * 3, dtype=torch.float32).view(1, 3, 2, 2)  # value = c * 4 + row * 2 + col
    t = pixel_target(img, 2, norm_pix=False)[0, 0]
    expected = [c * 4 + r * 2 + q for r in range(2) for q in range(2) for c in range(3)]
    assert t.tolist() == expected


def test_multi_scale_shapes_and_dims():
    target = PixelTarget((4, 8, 16, 32))
    out = target(torch.randn(1, 3, 64, 64))
    assert [t.shape[1:] for t in out] == [(256, 48), (64, 192), (16, 768), (4, 3072)]
    assert target.out_dims == [48, 192, 768, 3072]
