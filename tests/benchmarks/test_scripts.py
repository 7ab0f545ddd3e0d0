import importlib.util
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_every_benchmark_script_imports(script: Path):
    # Most scripts run for many minutes and have no test of their own: one whose helper moved away
    # (pool_scaling.py's did) must fail here, not at a measurer's next run.
    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it is imported
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    assert callable(getattr(module, "main", None)) or script.stem.endswith("_setup"), f"{script.name} has no main()"
