"""File formats shared by the stages: atomic writes, raw archives, prepared arrays.

Raw data arrives in one of two layouts (the official pickle batches, or class folders of images)
inside a tar (any compression) or a zip. `download` detects which from the content and records it
in the raw folder's `manifest.json`; `prepare` reads the archive through `iter_members` without
extracting 60,000 small files to disk.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from stages.common.errors import DataError, IntegrityError, TransientError

SPLITS = ("train", "val", "test")
SOURCE_SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PICKLE_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
PICKLE_TEST = "test_batch"
PICKLE_META = "batches.meta"


# --- atomic writes -------------------------------------------------------------------------


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _usual_mode(path: Path) -> None:
    """mkstemp/mkdtemp create 0600/0700; outputs get the modes an ordinary write would give."""
    base = 0o777 if path.is_dir() else 0o666
    path.chmod(base & ~_umask())


@contextlib.contextmanager
def _disk_full_is_transient(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise TransientError(f"disk full while writing {path}; free space and rerun") from None
        raise


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; move it into place only if the block succeeds.

    A crash, an exception or Ctrl-C leaves the previous file (or nothing), never half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffix last: some writers (Keras) insist on it.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _disk_full_is_transient(path):
            yield tmp
            _usual_mode(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling folder; it replaces `path` whole only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with _disk_full_is_transient(path):
            yield tmp
            _usual_mode(tmp)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path | str, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: Path | str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found; run the stage that writes it first (dvc repro)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}); rerun the stage that writes it (dvc repro -f)") from None


# --- prepared arrays -----------------------------------------------------------------------


def save_split(path: Path | str, images: np.ndarray, labels: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, images=images, labels=labels)


def load_split(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found; run `dvc repro prepare` first")
    try:
        with np.load(path) as data:
            return data["images"], data["labels"]
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path} is corrupt or not a prepared split ({err}); rerun `dvc repro -f prepare`") from None


# --- raw archives --------------------------------------------------------------------------


@dataclass(frozen=True)
class RawLayout:
    """What an archive holds, as detected from its member names."""

    kind: str  # "pickle-batches" or "class-folders"
    classes: list[str]  # folder names (sorted) or the batches.meta label names
    counts: dict[str, dict[str, int]]  # split -> class -> number of images (class folders only)


def container_of(path: Path) -> str:
    """'tar' or 'zip' from the file's first bytes; the name is not trusted."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        return "tar"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    raise IntegrityError(
        f"{path} is neither a tar(.gz/.bz2/.xz) nor a zip archive; point download.source at one"
    )


def archive_members(path: Path, container: str) -> Iterator[tuple[str, int, Callable[[], bytes]]]:
    """Each regular file of the archive, in archive order: its name, size and a reader. Nothing is
    read unless asked (a member too large to use can be skipped unread), and a tar is read as a
    stream: one pass, no index of a huge archive."""
    if container == "zip":
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, info.file_size, functools.partial(zf.read, info)
    else:
        with tarfile.open(path, "r|*") as tf:
            for member in tf:
                if member.isfile():
                    yield member.name, member.size, functools.partial(_read_tar_member, tf, member)


def _read_tar_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    stream = archive.extractfile(member)
    assert stream is not None  # a regular file
    return stream.read()


def iter_members(path: Path, container: str) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each regular file in the archive, in archive order."""
    try:
        for name, _, read in archive_members(path, container):
            yield name, read()
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise
        raise IntegrityError(f"{path} is corrupt or truncated ({err}); download it again") from None


def list_members(path: Path, container: str) -> list[str]:
    try:
        if container == "zip":
            with zipfile.ZipFile(path) as zf:
                return [i.filename for i in zf.infolist() if not i.is_dir()]
        with tarfile.open(path, "r:*") as tf:
            return [m.name for m in tf if m.isfile()]
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise IntegrityError(f"{path} is corrupt or truncated ({err}); download it again") from None


_HIDDEN = re.compile(r"(^|/)(\.|__MACOSX/)")


def class_folder_entry(name: str) -> tuple[str, str] | None:
    """(split, class) for `[prefix/]train|test/<class>/<image>`, None for anything else."""
    if _HIDDEN.search(name):
        return None
    parts = PurePosixPath(name).parts
    if len(parts) < 3 or parts[-3] not in SOURCE_SPLITS:
        return None
    if PurePosixPath(name).suffix.lower() not in IMAGE_SUFFIXES:
        return None
    return parts[-3], parts[-2]


def pickle_entry(name: str) -> str | None:
    base = PurePosixPath(name).name
    if base in PICKLE_TRAIN or base in (PICKLE_TEST, PICKLE_META):
        return base
    return None


def detect_layout(names: list[str], archive: Path) -> RawLayout:
    """Recognise the layout from member names, or say what was found instead."""
    pickles = {b for b in map(pickle_entry, names) if b}
    if PICKLE_META in pickles or any(b.startswith("data_batch_") for b in pickles):
        missing = sorted(set(PICKLE_TRAIN + (PICKLE_TEST, PICKLE_META)) - pickles)
        if missing:
            raise DataError(
                f"{archive}: CIFAR-10 python batches are incomplete, missing {', '.join(missing)}; "
                "use the full cifar-10-python.tar.gz"
            )
        return RawLayout("pickle-batches", [], {})
    counts: dict[str, dict[str, int]] = {s: {} for s in SOURCE_SPLITS}
    for entry in map(class_folder_entry, names):
        if entry:
            split, cls = entry
            counts[split][cls] = counts[split].get(cls, 0) + 1
    if not counts["train"] and not counts["test"]:
        sample = ", ".join(names[:3]) or "no files"
        raise DataError(
            f"{archive}: neither CIFAR-10 python batches nor train/<class>/<image> folders "
            f"(found {sample}); see docs/pipeline.md"
        )
    for split in SOURCE_SPLITS:
        if not counts[split]:
            raise DataError(f"{archive}: no '{split}/<class>/' image folders found; both train/ and test/ are needed")
    if set(counts["train"]) != set(counts["test"]):
        only = sorted(set(counts["train"]) ^ set(counts["test"]))
        raise DataError(f"{archive}: train/ and test/ have different class folders ({', '.join(only)}); make them match")
    return RawLayout("class-folders", sorted(counts["train"]), counts)
