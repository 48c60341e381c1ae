"""`fastmim data imagenet-like` (fastmim/data/imagenet_like.py): a folder of ImageNet-sized quality-90 JPEGs made
from the bundled photograph, the same on every run, never written over an existing path."""

import hashlib

from PIL import Image, JpegImagePlugin

from fastmim.cli import main
from fastmim.data.imagenet_like import _photo, imagenet_like_image


def test_the_folder_holds_imagenet_sized_quality_90_jpegs(tmp_path, capsys):
    dst = tmp_path / "inet"
    assert main(["data", "imagenet-like", str(dst), "--images", "8"]) == 0
    assert "wrote 8 JPEGs" in capsys.readouterr().out
    files = sorted(dst.iterdir())
    assert [f.name for f in files] == [f"{i:05d}.jpg" for i in range(8)]
    for f in files:
        with Image.open(f) as img:
            assert img.format == "JPEG" and img.size in ((500, 375), (375, 500))
            assert JpegImagePlugin.get_sampling(img) == 2  # 4:2:0, as ImageNet's photos
            # Pillow's quality-90 luminance table starts with 3 (quality 75: 8).
            assert img.quantization[0][0] == 3
        assert 30_000 < f.stat().st_size < 200_000  # photographic detail: ImageNet's files are ~110 KB
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_images_are_a_function_of_their_index():
    photo = _photo()
    digest = [hashlib.sha256(imagenet_like_image(i, photo).tobytes()).hexdigest() for i in (0, 1, 0)]
    assert digest[0] == digest[2] != digest[1]


def test_an_existing_destination_is_refused_and_left_alone(tmp_path, capsys):
    dst = tmp_path / "inet"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep")
    assert main(["data", "imagenet-like", str(dst), "--images", "2"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["mine.txt"]
    assert main(["data", "imagenet-like", str(tmp_path / "x"), "--images", "0"]) == 2
    assert "--images is 0" in capsys.readouterr().err
