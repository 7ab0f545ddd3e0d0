from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest

from tests import synthetic
from tests.helpers import REPO, TINY_TEST, TINY_TRAIN

# Nothing may wait on the network: this machine reaches no analytics host.
os.environ.update(DVC_NO_ANALYTICS="1", GX_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", KERAS_BACKEND="tensorflow")
# Stages' output must stream line by line: tests act on "Epoch N/M" as it appears.
os.environ["PYTHONUNBUFFERED"] = "1"


# `make test` hands whole files to its two processes in collection order (--no-loadscope-reorder),
# the next file to the first process free: the longest files go first, so no process runs one
# alone at the end.
LONGEST_FIRST = ("pipelines/test_cluster.py", "pipelines/test_flow.py", "pipelines/test_sweep.py",
                 "pipelines/test_retrain.py", "test_reliability.py", "test_e2e.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """An end-to-end test is slow too: `make test-fast` (-m 'not slow') leaves it out."""
    for item in items:
        if item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.slow)
    tests = Path(__file__).parent
    ranks = {tests / name: rank for rank, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: ranks.get(item.path, len(LONGEST_FIRST)))  # stable: each file keeps its order


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www; yields (root dir, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """An empty working folder holding the repo's params.yaml, for running a stage in."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.tar.gz"
    return synthetic.write_tar_gz(path, synthetic.class_folder_files(TINY_TRAIN, TINY_TEST))
