import pytest

from stages.common import dataio
from stages.common.errors import DataError, IntegrityError
from tests import synthetic


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), dataio.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with dataio.atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), dataio.atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["a"]


def test_container_is_detected_from_content_not_name(tmp_path):
    files = synthetic.class_folder_files(1, 1, ["a", "b"])
    assert dataio.container_of(synthetic.write_zip(tmp_path / "data.tar.gz", files)) == "zip"
    assert dataio.container_of(synthetic.write_tar_gz(tmp_path / "data.zip", files)) == "tar"
    (tmp_path / "junk.tar.gz").write_bytes(b"hello" * 200)
    with pytest.raises(IntegrityError, match="neither a tar"):
        dataio.container_of(tmp_path / "junk.tar.gz")


def test_truncated_archive_is_an_integrity_error(tmp_path):
    path = synthetic.write_tar_gz(tmp_path / "d.tar.gz", synthetic.class_folder_files(5, 2, ["a", "b"]))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(IntegrityError, match="corrupt or truncated"):
        list(dataio.iter_members(path, "tar"))


def test_class_folder_entries_accept_a_prefix_and_skip_noise():
    assert dataio.class_folder_entry("cifar/train/cat/1.jpg") == ("train", "cat")
    assert dataio.class_folder_entry("test/dog/2.PNG") == ("test", "dog")
    assert dataio.class_folder_entry("train/cat/.DS_Store") is None
    assert dataio.class_folder_entry("__MACOSX/train/cat/._1.jpg") is None
    assert dataio.class_folder_entry("README.md") is None


@pytest.mark.parametrize(
    "names, message",
    [
        (["train/a/1.png", "train/b/1.png"], "no 'test/<class>/' image folders"),
        (["train/a/1.png", "test/a/1.png", "test/b/1.png"], "different class folders (b)"),
        (["readme.txt"], "neither CIFAR-10 python batches nor train/<class>/<image>"),
        (["cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/batches.meta"], "missing data_batch_2"),
    ],
)
def test_unrecognised_layouts_say_what_was_found(tmp_path, names, message):
    with pytest.raises(DataError) as err:
        dataio.detect_layout(names, tmp_path / "x.tar")
    assert message in str(err.value)


def test_disk_full_is_transient_and_names_the_path(tmp_path, monkeypatch):
    import errno

    from stages.common.errors import TransientError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "metrics.json"
    target.write_text("old")
    monkeypatch.setattr("pathlib.Path.write_text", full)
    with pytest.raises(TransientError, match=f"disk full while writing {target}; free space and rerun"):
        dataio.write_json(target, {"accuracy": 1})
    monkeypatch.undo()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    with pytest.raises(TransientError, match="disk full"), dataio.atomic_dir(tmp_path / "out"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert not (tmp_path / "out").exists()


def test_atomic_outputs_get_the_usual_modes(tmp_path):
    """mkstemp/mkdtemp make 0600/0700; outputs are as readable as any file the user writes."""
    import os

    previous = os.umask(0o022)
    try:
        dataio.write_json(tmp_path / "m.json", {"a": 1})
        with dataio.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "x.txt").write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_a_corrupt_split_or_json_is_a_data_error(tmp_path):
    from stages.common.errors import DataError

    (tmp_path / "train.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match=r"train.npz is corrupt or not a prepared split .*dvc repro -f prepare"):
        dataio.load_split(tmp_path / "train.npz")
    (tmp_path / "classes.json").write_text("[\"cat\", ")
    with pytest.raises(DataError, match="classes.json is not valid JSON"):
        dataio.read_json(tmp_path / "classes.json")


def test_run_main_turns_any_error_into_one_line(capsys, monkeypatch):
    from stages.common.errors import TRACEBACK_ENV, run_main

    def broken():
        raise KeyError("images")

    def denied():
        raise PermissionError(13, "Permission denied", "data/prepared/train.npz")

    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    for main, code, line in [
        (broken, 1, f"error: unexpected KeyError: 'images'; rerun with {TRACEBACK_ENV}=1 to see the traceback"),
        (denied, 1, "error: permission denied: data/prepared/train.npz; fix the file's permissions"),
        (lambda: (_ for _ in ()).throw(MemoryError()), 2, "error: out of memory; lower train.batch_size"),
    ]:
        with pytest.raises(SystemExit) as ended:
            run_main(main)
        err = capsys.readouterr().err
        assert ended.value.code == code and err.startswith(line) and len(err.strip().splitlines()) == 1
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(SystemExit):
        run_main(broken)
    assert "Traceback (most recent call last)" in capsys.readouterr().err
