import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from stages.common.errors import ConfigError, DataError, IntegrityError
from stages.common.schemas import DownloadParams
from stages.download import download, verify_checksums
from tests import synthetic
from tests.helpers import run_stage, set_params, sha256_of

CLASSES = synthetic.CLASSES


def params(source, md5=None, sha256=None, classes=CLASSES) -> DownloadParams:
    """A local archive is pinned by its sha256 unless the test gives a checksum."""
    local = not str(source).startswith("http") and Path(source).is_file()
    if local and md5 is None and sha256 is None:
        sha256 = sha256_of(source)
    return DownloadParams(source=str(source), md5=md5, sha256=sha256, classes=classes, timeout_s=10)


@pytest.fixture(scope="module")
def files():
    return synthetic.class_folder_files(3, 2)


def test_class_folder_tar_gz_served_over_http(tmp_path, http_server, files):
    root, url = http_server
    archive = synthetic.write_tar_gz(root / "cifar.tar.gz", files, prefix="cifar10/")
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    manifest = download(params(f"{url}/cifar.tar.gz", sha256=sha), tmp_path / "raw")
    assert manifest["layout"] == "class-folders" and manifest["container"] == "tar"
    assert manifest["counts"]["train"]["cat"] == 3 and manifest["counts"]["test"]["truck"] == 2
    assert (tmp_path / "raw" / "archive").read_bytes() == archive.read_bytes()
    assert json.loads((tmp_path / "raw" / "manifest.json").read_text())["sha256"] == sha


def test_pickle_batches_over_http_with_md5(tmp_path, http_server):
    root, url = http_server
    archive = synthetic.write_tar_gz(root / "cifar-10-python.tar.gz", synthetic.pickle_batches_files(10, 10))
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    manifest = download(params(f"{url}/cifar-10-python.tar.gz", md5=md5), tmp_path / "raw")
    assert manifest["layout"] == "pickle-batches"
    assert manifest["classes"] == CLASSES


def test_zip_and_directory_sources(tmp_path, files):
    zipped = synthetic.write_zip(tmp_path / "data.bin", files)
    assert download(params(zipped), tmp_path / "raw1")["container"] == "zip"
    folder = synthetic.write_directory(tmp_path / "tree", files)
    with pytest.raises(ConfigError, match="is a local path, which DVC cannot watch") as refused:
        download(params(folder), tmp_path / "raw2")
    pinned = str(refused.value).rsplit("download.sha256: ", 1)[1]
    manifest = download(params(folder, sha256=pinned), tmp_path / "raw2")
    assert manifest["container"] == "tar" and sum(manifest["counts"]["train"].values()) == 30
    next(folder.rglob("*.png")).touch()  # a new mtime, same content: the packed folder's checksum holds
    assert download(params(folder, sha256=pinned), tmp_path / "raw3")["sha256"] == pinned


def test_a_local_source_changed_in_place_is_not_used_silently(tmp_path, files):
    """DVC sees params, not a file outside the repo: the pinned checksum is what notices."""
    archive = synthetic.write_tar_gz(tmp_path / "data.tar.gz", files)
    with pytest.raises(ConfigError, match=f"set download.sha256: {sha256_of(archive)}"):
        download(DownloadParams(str(archive), None, None, CLASSES, 10), tmp_path / "raw")
    pinned = sha256_of(archive)
    download(params(archive, sha256=pinned), tmp_path / "raw")
    changed = dict(files)
    cat, dog = (next(name for name in files if name.startswith(f"train/{c}/")) for c in ("cat", "dog"))
    changed[cat] = files[dog]
    synthetic.write_tar_gz(archive, changed)  # same path, new content
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        download(params(archive, sha256=pinned), tmp_path / "raw")


def test_checksum_mismatch_names_both_hashes_and_leaves_nothing(tmp_path, http_server, files):
    root, url = http_server
    archive = synthetic.write_tar_gz(root / "c.tar.gz", files)
    actual = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(IntegrityError) as err:
        download(params(f"{url}/c.tar.gz", md5="0" * 32), tmp_path / "raw")
    assert "0" * 32 in str(err.value) and actual in str(err.value)
    assert list(tmp_path.iterdir()) == [tmp_path / "www"]


def test_flipped_byte_fails_the_checksum(tmp_path, files):
    archive = synthetic.write_tar_gz(tmp_path / "c.tar.gz", files)
    good = hashlib.sha256(archive.read_bytes()).hexdigest()
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        download(params(archive, sha256=good), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_http_404_is_a_config_error(tmp_path, http_server):
    _, url = http_server
    with pytest.raises(ConfigError, match="HTTP 404"):
        download(params(f"{url}/missing.tar.gz"), tmp_path / "raw")


def test_unexpected_classes_are_named(tmp_path):
    nine = synthetic.class_folder_files(1, 1, CLASSES[:9])
    with pytest.raises(DataError, match="missing or empty class\\(es\\) truck"):
        download(params(synthetic.write_tar_gz(tmp_path / "nine.tar.gz", nine)), tmp_path / "raw")
    eleven = synthetic.class_folder_files(1, 1, CLASSES + ["unicorn"])
    with pytest.raises(DataError, match="unknown class\\(es\\) unicorn"):
        download(params(synthetic.write_tar_gz(tmp_path / "eleven.tar.gz", eleven)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_a_wrong_checksum_on_a_directory_source_is_an_integrity_error(tmp_path, files):
    folder = synthetic.write_directory(tmp_path / "tree", files)
    with pytest.raises(IntegrityError, match="md5 mismatch"):
        download(params(folder, md5="0" * 32), tmp_path / "raw")


def test_pickle_labels_follow_download_classes_by_name(tmp_path):
    """download.classes in another order than batches.meta relabels each image by its class name."""
    from stages.common import dataio
    from stages.prepare import _read_pickles, read_raw

    archive = synthetic.write_tar_gz(tmp_path / "py.tar.gz", synthetic.pickle_batches_files(10, 10))
    reordered = list(reversed(CLASSES))
    manifest = download(params(archive, classes=reordered), tmp_path / "raw")
    assert manifest["classes"] == reordered and manifest["source_classes"] == CLASSES
    original = _read_pickles(dataio.iter_members(archive, "tar"))
    source, classes = read_raw(tmp_path / "raw", convert=False)
    assert classes == reordered
    for split in ("train", "test"):
        labels = source[split][1]
        assert np.array_equal(labels, 9 - original[split][1]) and len(set(labels.tolist())) == 10
        names = [classes[i] for i in labels]
        assert names == [CLASSES[i] for i in original[split][1]]  # every image keeps its class name


def test_verify_checksums_accepts_matching_and_skips_null():
    verify_checksums({"md5": "ab", "sha256": "cd"}, {"md5": "AB", "sha256": None}, "x")


def test_main_missing_source_is_one_line_and_exit_2(in_tmp):
    set_params(in_tmp / "params.yaml", download={"source": "nowhere.tar.gz"})
    result = run_stage("download", in_tmp)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "download.source 'nowhere.tar.gz' does not exist" in result.stderr
    assert not (in_tmp / "data").exists() or not any((in_tmp / "data").iterdir())


def pinned_download(folder: Path, out: Path) -> dict:
    """Download a folder source, pinning it with the checksum the stage asks for."""
    try:
        return download(params(folder), out)
    except ConfigError as refused:
        return download(params(folder, sha256=str(refused).rsplit("download.sha256: ", 1)[1]), out)


@pytest.mark.parametrize("link", ["file out", "folder out", "broken", "loop"])
def test_links_that_leave_a_folder_source_are_refused_naming_the_users_path(tmp_path, files, link):
    """A link in a class folder to /etc/passwd was packed into data/raw (and so DVC's cache and
    remote) without a word."""
    folder = synthetic.write_directory(tmp_path / "tree", files)
    outside = tmp_path / "elsewhere"
    (outside / "cat").mkdir(parents=True)
    (outside / "secret.png").write_bytes(b"host file")
    where = {"file out": (folder / "train/cat/README.png", outside / "secret.png"),
             "folder out": (folder / "train/unicorn", outside / "cat"),
             "broken": (folder / "train/cat/gone.png", tmp_path / "nothing"),
             "loop": (folder / "train/cat/again", folder / "train")}[link]
    where[0].symlink_to(where[1])
    with pytest.raises(DataError) as refused:
        pinned_download(folder, tmp_path / "raw")
    assert str(refused.value).startswith(str(where[0])), refused.value
    assert not (tmp_path / "raw").exists()


def test_a_folder_source_packs_its_images_and_links_inside_it(tmp_path, files):
    folder = synthetic.write_directory(tmp_path / "tree", files)
    (folder / "README.txt").write_text("not an image")
    (folder / "train/cat/.DS_Store").write_bytes(b"\0")
    real = tmp_path / "tree/shared/cat"
    (folder / "train/cat").rename(real.parent.mkdir(parents=True) or real)
    (folder / "train/cat").symlink_to(real)  # a class folder linked from elsewhere in the source
    manifest = pinned_download(folder, tmp_path / "raw")
    assert manifest["counts"]["train"]["cat"] == 3
    members = __import__("tarfile").open(tmp_path / "raw/archive").getnames()
    assert all(name.endswith(".png") for name in members), members


def test_a_folder_source_with_unmatched_classes_names_the_folder(tmp_path, files):
    folder = synthetic.write_directory(tmp_path / "tree", files)
    (folder / "train/unicorn").mkdir()
    (folder / "train/unicorn/a.png").write_bytes(files[next(iter(files))])
    with pytest.raises(DataError) as refused:
        pinned_download(folder, tmp_path / "raw")
    assert str(refused.value).startswith(f"{folder}:") and ".tmp" not in str(refused.value), refused.value


def test_a_folder_source_changed_in_place_is_refused_naming_the_new_pin(tmp_path, files):
    """Overwriting images in a pinned folder kept every stage up to date on the old data."""
    from stages.download import check_source_unchanged

    folder = synthetic.write_directory(tmp_path / "tree", files)
    manifest = pinned_download(folder, tmp_path / "raw")
    pinned = params(folder, sha256=manifest["sha256"])
    check_source_unchanged(pinned, manifest)  # nothing changed
    image = next(folder.rglob("*.png"))
    image.touch()  # a new time, the same content: still the pinned data
    check_source_unchanged(pinned, manifest)
    image.write_bytes(next(content for content in files.values() if content != image.read_bytes()))
    with pytest.raises(DataError) as refused:
        check_source_unchanged(pinned, manifest)
    assert str(refused.value).startswith(f"download.source {folder} changed since it was downloaded: its sha256 "
                                         "is now "), refused.value
    new_pin = str(refused.value).split("set download.sha256: ")[1].split(",")[0]
    assert download(params(folder, sha256=new_pin), tmp_path / "raw2")["sha256"] == new_pin


def test_a_source_that_is_not_here_is_not_a_change(tmp_path, files):
    """A worker's clone takes the data from the DVC remote; the source folder exists elsewhere."""
    from stages.download import check_source_unchanged

    folder = synthetic.write_directory(tmp_path / "tree", files)
    manifest = pinned_download(folder, tmp_path / "raw")
    shutil.rmtree(folder)
    check_source_unchanged(params(folder, sha256=manifest["sha256"]), manifest)
