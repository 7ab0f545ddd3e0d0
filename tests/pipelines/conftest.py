from __future__ import annotations

import os

import pytest

from tests.helpers import BIN, prefect_server


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A real Prefect server on 127.0.0.1 (SQLite in a temporary PREFECT_HOME); yields its API URL."""
    with prefect_server(tmp_path_factory.mktemp("prefect_home")) as url:
        yield url


@pytest.fixture
def prefect_env(prefect_api, tmp_path):
    return {**os.environ, "PREFECT_API_URL": prefect_api, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "PREFECT_HOME": str(tmp_path / "client_home")}
