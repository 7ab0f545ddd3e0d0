"""Images as a person sees them: orientation, transparency, bit depth; hostile files are one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.predict import PredictError, load_pixels


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:, :8] = 255  # a white band on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the band shows at the top
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    shown = load_pixels(tmp_path / "phone.jpg")
    assert shown[:6].mean() > 200 and shown[-6:].mean() < 50


def test_transparent_pixels_are_white_not_their_hidden_colour(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 255  # red, but fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "logo.png")
    assert np.all(load_pixels(tmp_path / "logo.png") == 255.0)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.full((32, 32), 32768, np.uint16)
    values[:, 16:] = 65535
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    image.save(tmp_path / "scan.png")
    pixels = load_pixels(tmp_path / "scan.png")
    assert pixels[0, 0, 0] == 128.0 and pixels[0, 31, 0] == 255.0


def test_decompression_bombs_and_unreadable_files_are_one_line_errors(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: past the warning threshold
    with pytest.raises(PredictError, match="big.png is too large to be a safe image to decode"):
        load_pixels(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # past twice the limit: Pillow's own error
    with pytest.raises(PredictError, match="too large"):
        load_pixels(tmp_path / "big.png")
    (tmp_path / "half.png").write_bytes((tmp_path / "big.png").read_bytes()[:60])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**8)
    with pytest.raises(PredictError, match="half.png is not a readable image"):
        load_pixels(tmp_path / "half.png")
