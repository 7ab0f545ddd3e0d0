"""download: fetch the dataset archive, verify its checksum, record its layout.

Its folder (dvc.yaml's paths.raw) holds the archive and `manifest.json`.

`download.source` is a URL, a local archive (tar of any compression, or zip) or a directory
holding `train/<class>/` and `test/<class>/` folders (packed into a tar here, so the folder is
always one archive plus `manifest.json` and DVC tracks two files, not 60,000).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from stages.common import dataio
from stages.common.errors import ConfigError, DataError, IntegrityError, PipelineError, TransientError, run_main
from stages.common.params import load_section
from stages.common.paths import MANIFEST, stage_paths
from stages.common.schemas import DownloadParams

CHUNK = 1 << 20


# --- pure parts ----------------------------------------------------------------------------


def verify_checksums(actual: dict[str, str], expected: dict[str, str | None], source: str) -> None:
    """Raise naming both hashes when an expected checksum differs from the actual one."""
    for algo, want in expected.items():
        if want is not None and want.lower() != actual[algo]:
            raise IntegrityError(
                f"{algo} mismatch for {source}: expected {want.lower()} (download.{algo}), got {actual[algo]}; "
                f"the file is corrupt or a different file: fetch it again, or if this source is intended "
                f"set download.{algo} to {actual[algo]}"
            )


def check_classes(found: list[str], expected: list[str] | None, archive: str) -> list[str]:
    """The class names in label order: the params' order when given, else the archive's."""
    if expected is None:
        if len(found) < 2:
            raise DataError(f"{archive}: found {len(found)} class(es) {found}; at least 2 are needed")
        return found
    missing = [c for c in expected if c not in found]
    unknown = [c for c in found if c not in expected]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing or empty class(es) {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown class(es) {', '.join(unknown)}")
        raise DataError(
            f"{archive}: found {len(found)} classes, expected the {len(expected)} in download.classes: "
            f"{'; '.join(parts)}; fix the archive or set download.classes (null accepts any)"
        )
    return list(expected)


def inspect_archive(archive: Path, classes: list[str] | None) -> dict:
    """Container, layout, class names (label order) and image counts of a raw archive."""
    container = dataio.container_of(archive)
    names = dataio.list_members(archive, container)
    layout = dataio.detect_layout(names, archive)
    if layout.kind == "pickle-batches":
        found = _pickle_label_names(archive, container)
        counts: dict[str, dict[str, int]] = {}
    else:
        found, counts = layout.classes, layout.counts
    return {
        "container": container,
        "layout": layout.kind,
        "classes": check_classes(found, classes, str(archive)),
        # The archive's own label order (batches.meta): prepare maps its label numbers by name.
        "source_classes": found,
        "counts": counts,
    }


def _pickle_label_names(archive: Path, container: str) -> list[str]:
    for name, content in dataio.iter_members(archive, container):
        if dataio.pickle_entry(name) == dataio.PICKLE_META:
            # The official batches are pickles; the checksum above vouches for their origin.
            meta = pickle.loads(content, encoding="bytes")
            return [n.decode() if isinstance(n, bytes) else n for n in meta[b"label_names"]]
    raise DataError(f"{archive}: batches.meta not found; use the full cifar-10-python.tar.gz")


# --- fetching ------------------------------------------------------------------------------


def _copy_hashing(src: BinaryIO, dst: BinaryIO, total: int | None, label: str) -> dict[str, str]:
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with tqdm(total=total, unit="B", unit_scale=True, desc=label, mininterval=1, leave=False) as bar:
        while chunk := src.read(CHUNK):
            md5.update(chunk)
            sha256.update(chunk)
            dst.write(chunk)
            bar.update(len(chunk))
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def fetch(source: str, dest: Path, timeout_s: float) -> dict[str, str]:
    """Copy `source` to `dest` (a temporary path) and return its md5 and sha256."""
    if source.startswith(("http://", "https://")):
        return _fetch_url(source, dest, timeout_s)
    path = Path(source.removeprefix("file://")).expanduser()
    if path.is_dir():
        left_out = _pack_directory(path, dest)
        if left_out:
            print(f"warning: {len(left_out)} file(s) in {source} are not images ({', '.join(dataio.IMAGE_SUFFIXES)}) "
                  f"and were left out, e.g. {left_out[0]}")
        with open(dest, "rb") as packed, open(os.devnull, "wb") as null:
            return _copy_hashing(packed, null, None, "hashing")
    if not path.is_file():
        raise ConfigError(
            f"download.source '{source}' does not exist (relative paths start at the project root); "
            "set it to a URL, an archive or a directory"
        )
    with open(path, "rb") as src, open(dest, "wb") as dst:
        return _copy_hashing(src, dst, path.stat().st_size, path.name)


def _fetch_url(url: str, dest: Path, timeout_s: float) -> dict[str, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(dest, "wb") as dst:
            length = resp.headers.get("Content-Length")
            digests = _copy_hashing(resp, dst, int(length) if length else None, url.rsplit("/", 1)[-1])
            if length and dest.stat().st_size != int(length):
                raise TransientError(f"download of {url} ended early ({dest.stat().st_size} of {length} bytes); rerun")
            return digests
    except urllib.error.HTTPError as err:
        if err.code >= 500 or err.code == 429:
            raise TransientError(f"{url} answered HTTP {err.code}; retry later") from None
        raise ConfigError(f"{url} answered HTTP {err.code} {err.reason}; check download.source") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise TransientError(
            f"could not fetch {url} ({reason}); check the network, or set download.source to a local copy"
        ) from None


def source_images(root: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """The image files under a folder source, as (name in the archive, file to read), and the
    names of the other files, which are left out.

    Links are followed only while they stay inside the folder: one that leads out of it (to a
    host file such as /etc/passwd, which would land in DVC's cache and remote) or nowhere is
    refused, naming the link as the user wrote it. Sockets, pipes and devices are left out.
    """
    real_root = root.resolve()
    images: list[tuple[str, Path]] = []
    others: list[str] = []

    def visit(folder: Path, prefix: str, seen: frozenset[Path]) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            name, shown = f"{prefix}{entry.name}", root / f"{prefix}{entry.name}"
            target = Path(entry.path)
            if entry.is_symlink():
                target = target.resolve()
                if not target.exists():
                    raise DataError(f"{shown} is a link to {os.readlink(entry.path)}, which does not exist; "
                                    "remove the link or restore its target")
                if not target.is_relative_to(real_root):
                    raise DataError(f"{shown} links to {target}, outside download.source {root}; links may only "
                                    "point inside the source folder: copy the file in (cp -L) or remove the link")
            if target.is_dir():
                if target.resolve() in seen:
                    raise DataError(f"{shown} links back to a folder that contains it; remove the link")
                visit(target, f"{name}/", seen | {target.resolve()})
            elif target.is_file() and target.suffix.lower() in dataio.IMAGE_SUFFIXES:
                images.append((name, target))
            else:
                others.append(name)

    visit(real_root, "", frozenset({real_root}))
    return images, others


def _pack_directory(root: Path, dest: Path) -> list[str]:
    """A tar of the folder's images whose bytes depend on file names and contents only (no times,
    owners or modes), so its checksum identifies the data and download.sha256 can pin it. Returns
    the names of the files left out (not images)."""
    images, others = source_images(root)
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, path in images:
            info = tarfile.TarInfo(name)
            info.size, info.mode = path.stat().st_size, 0o644
            with open(path, "rb") as fh:
                tf.addfile(info, fh)
    return others


# --- stage ---------------------------------------------------------------------------------


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def require_checksum_for_local(params: DownloadParams, digests: dict[str, str]) -> None:
    """DVC sees params, not files outside the repo: a local source that changed in place would never
    be fetched again. Its checksum, a param, is what makes a change rerun the pipeline."""
    if not is_url(params.source) and not (params.md5 or params.sha256):
        raise ConfigError(
            f"download.source '{params.source}' is a local path, which DVC cannot watch for changes; "
            f"pin its content: set download.sha256: {digests['sha256']}"
        )


def source_fingerprint(source: str) -> str | None:
    """The sizes and modification times of a local source's files (none is read), or None for a
    URL or a source that is not there."""
    if is_url(source):
        return None
    path = Path(source.removeprefix("file://")).expanduser()
    if path.is_dir():
        entries = [(name, file.stat()) for name, file in source_images(path)[0]]
    elif path.is_file():
        entries = [("", path.stat())]
    else:
        return None
    digest = hashlib.sha256()
    for name, stat in entries:
        digest.update(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def check_source_unchanged(params: DownloadParams, manifest: dict) -> None:
    """Refuse a local source that changed in place since download read it: DVC sees params, not
    files outside the repo, so every stage would stay up to date on the old data. Cheap while the
    files' sizes and times hold; when they moved, the pin is recomputed, and only a content that
    no longer matches it is refused."""
    recorded, now = manifest.get("fingerprint"), source_fingerprint(params.source)
    # Nothing to compare where the source is not here (a worker's clone took the data from the
    # DVC remote) or was read before fingerprints were recorded.
    if manifest.get("source") != params.source or recorded is None or now is None or now == recorded:
        return
    with tempfile.TemporaryDirectory() as tmp, named_as_the_user_wrote_it(Path(tmp) / "archive", params.source):
        digests = fetch(params.source, Path(tmp) / "archive", params.timeout_s)
    for algo in ("sha256", "md5"):
        pinned = getattr(params, algo)
        if pinned and pinned.lower() != digests[algo]:
            raise DataError(f"download.source {params.source} changed since it was downloaded: its {algo} is now "
                            f"{digests[algo]}, not the pinned {pinned.lower()}; to train on the new content set "
                            f"download.{algo}: {digests[algo]}, or restore the source")


def download(params: DownloadParams, out_dir: Path) -> dict:
    """Fetch, verify and inspect into a temporary folder, then move it to `out_dir` whole."""
    with dataio.atomic_dir(out_dir) as tmp_dir:
        archive = tmp_dir / "archive"
        with named_as_the_user_wrote_it(archive, params.source):
            digests = fetch(params.source, archive, params.timeout_s)
            require_checksum_for_local(params, digests)
            verify_checksums(digests, {"md5": params.md5, "sha256": params.sha256}, params.source)
            manifest = {"source": params.source, "bytes": archive.stat().st_size, **digests,
                        "fingerprint": source_fingerprint(params.source)}
            manifest.update(inspect_archive(archive, params.classes))
        dataio.write_json(tmp_dir / MANIFEST, manifest)
    return manifest


@contextlib.contextmanager
def named_as_the_user_wrote_it(internal: Path, source: str) -> Iterator[None]:
    """Errors about the fetched copy (a temporary file) name download.source instead."""
    try:
        yield
    except PipelineError as err:
        if str(internal) not in str(err):
            raise
        raise type(err)(str(err).replace(str(internal), source)) from None


def main() -> None:
    out = stage_paths("download", "out")["out"]
    params: DownloadParams = load_section("download")
    manifest = download(params, out)
    if not (params.md5 or params.sha256):
        print(f"warning: no checksum configured; this source's sha256 is {manifest['sha256']}")
    counts = {s: sum(c.values()) for s, c in manifest["counts"].items()}
    print(
        f"download: {manifest['bytes']:,} bytes, {manifest['layout']} ({manifest['container']}), "
        f"{len(manifest['classes'])} classes{', images ' + str(counts) if counts else ''} -> {out}"
    )


if __name__ == "__main__":
    run_main(main)
