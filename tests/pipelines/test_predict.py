"""Images as a person sees them: orientation, transparency, bit depth; hostile files are one line;
folders and archives streamed into a CSV."""

from __future__ import annotations

import csv
import tarfile
import zipfile
from pathlib import Path

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


def write_images(folder: Path, images: np.ndarray) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:03d}.png" for i in range(len(images))]
    for path, image in zip(paths, images):
        Image.fromarray(image).save(path)
    return paths


def test_predict_streams_folders_and_archives_into_a_csv_and_skips_what_it_cannot_read(exported, tmp_path):
    """`predict DIR|ARCHIVE --out CSV`: every image a row in order, a broken one an error row, the exit
    code 2 for it, a progress bar on stderr; the same answers as image by image."""
    from tests.helpers import ENV, cli
    from tests.pipelines.conftest import CLASSES
    from tests.synthetic import make_images

    images, labels = make_images(3, CLASSES, seed=3)
    paths = write_images(tmp_path / "photos", images)
    (tmp_path / "photos" / "broken.png").write_bytes(b"not a png")
    with tarfile.open(tmp_path / "photos.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "photos", arcname="photos")
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as archive:
        for path in paths:
            archive.write(path, f"photos/{path.name}")
    out = tmp_path / "predictions.csv"
    result = cli(ENV, "predict", str(tmp_path / "photos.tar.gz"), str(tmp_path / "photos.zip"), "--model",
                 str(exported), "--out", str(out), "--top-k", "2", "--batch-size", "5", "--progress")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: 1 image(s) could not be read and were skipped, the first: {tmp_path / 'photos.tar.gz'}:"
        "photos/broken.png is not a readable image (no format Pillow decodes); send a JPEG, PNG, ...")
    assert f"{2 * len(paths) + 1} images [" in result.stderr  # the bar's last state (a tar.gz has no count)
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["file", "class", "probability", "class_2", "probability_2", "error"]
    tar_rows = rows[:len(paths) + 1]
    assert [r["file"].split(":")[-1] for r in tar_rows] == [f"photos/{p.name}" for p in paths] + ["photos/broken.png"]
    assert tar_rows[-1]["class"] == "" and tar_rows[-1]["error"].endswith("is not a readable image (no format "
                                                                          "Pillow decodes); send a JPEG, PNG, ...")
    from pipelines.predict import predict_files

    alone = list(predict_files(paths, exported, 2))
    for archive_rows in (tar_rows[:-1], rows[len(paths) + 1:]):
        assert [(r["class"], float(r["probability"]), r["class_2"]) for r in archive_rows] == [
            (ranked[0][0], round(ranked[0][1], 6), ranked[1][0]) for _, ranked in alone]
    assert [r["class"] for r in rows[len(paths) + 1:]] == [CLASSES[label] for label in labels]


def test_a_damaged_archive_keeps_the_images_before_the_damage(exported, tmp_path):
    from pipelines.predict import predict_files

    images = np.random.default_rng(4).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    write_images(tmp_path / "photos", images)
    with tarfile.open(tmp_path / "photos.tar", "w") as archive:
        archive.add(tmp_path / "photos", arcname="photos")
    whole = (tmp_path / "photos.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[:len(whole) // 2])
    results = list(predict_files([tmp_path / "cut.tar"], exported))
    assert 10 < len(results) < 40 and all(not isinstance(r, PredictError) for _, r in results[:-1])
    name, error = results[-1]
    assert name == str(tmp_path / "cut.tar") and isinstance(error, PredictError)
    assert str(error).startswith(f"{tmp_path / 'cut.tar'} is a corrupt or truncated archive")


def test_an_archive_member_too_large_to_be_an_image_is_skipped_unread(exported, tmp_path, monkeypatch):
    from pipelines import predict

    write_images(tmp_path / "photos", np.zeros((2, 32, 32, 3), np.uint8))
    (tmp_path / "photos" / "huge.png").write_bytes(b"\0" * 5000)
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as archive:
        for path in sorted((tmp_path / "photos").iterdir()):
            archive.write(path, path.name)
    monkeypatch.setattr(predict, "MAX_MEMBER_BYTES", 4000)
    results = dict(predict.predict_files([tmp_path / "photos.zip"], exported))
    assert str(results[f"{tmp_path / 'photos.zip'}:huge.png"]).endswith("is larger than 0 MiB; skipped unread")
    assert sum(not isinstance(r, PredictError) for r in results.values()) == 2


def test_a_csv_stopped_half_way_is_not_written_and_the_last_one_stays(tmp_path):
    from pipelines.predict import write_predictions

    out = tmp_path / "predictions.csv"
    out.write_text("the last complete run\n")

    def predictions():
        yield "a.png", [("cat", 0.9)]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        for _ in write_predictions(predictions(), out, 1):
            pass
    assert out.read_text() == "the last complete run\n" and list(tmp_path.iterdir()) == [out]
