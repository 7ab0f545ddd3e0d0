"""What the sweep benchmarks share: the environment their CLI runs in, and a project whose
baseline is run and committed once, so every point restores download, prepare and validate."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test suite's project set-up is reused; tests/ is not installed

from tests.helpers import BIN, git_dvc_project, set_params

SPACE = {  # the default recipe's knobs that make or break a short run
    "train.learning_rate": {"log_uniform": [0.05, 3.0]},
    "train.weight_decay": {"log_uniform": [0.0005, 0.05]},
    "train.label_smoothing": {"uniform": [0.0, 0.3]},
}


def bench_env() -> dict[str, str]:
    """This environment with the project's tools first on PATH, and no Prefect API: each sweep
    starts Prefect's own temporary one, as a user's first sweep does."""
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return env


def committed_baseline(folder: Path, env: dict[str, str], **params: dict[str, Any]) -> Path:
    """A project in `folder` with `params` set (as set_params takes them), run with `dvc repro`
    and committed as the baseline the sweeps start from."""
    repo = git_dvc_project(folder)
    set_params(repo / "params.yaml", **params)
    subprocess.run([str(BIN / "dvc"), "repro", "-q"], cwd=repo, env=env, check=True, capture_output=True)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "baseline run"], cwd=repo, check=True)
    return repo


def add_mirror_arguments(parser: argparse.ArgumentParser, *, epochs: int, train_per_class: int = 300) -> None:
    """The options `mirror_params` reads: the archive, its slice, the epochs and the batch size."""
    parser.add_argument("--source", required=True)
    parser.add_argument("--sha256", required=True)
    parser.add_argument("--train-per-class", type=int, default=train_per_class)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=256)


def mirror_params(args: Any) -> dict[str, dict[str, Any]]:
    """A slice of a class-folder archive (the CIFAR-10 mirror) as the project's data, trained with
    the default recipe for `args.epochs` at `args.batch_size`."""
    return {"download": {"source": str(Path(args.source).resolve()), "md5": None, "sha256": args.sha256},
            "prepare": {"train_limit_per_class": args.train_per_class, "test_limit_per_class": args.test_per_class},
            "validate": {"expected_per_class": None},
            "train": {"epochs": args.epochs, "batch_size": args.batch_size}}


@contextlib.contextmanager
def mirror_baseline(args: argparse.Namespace, env: dict[str, str], prefix: str,
                    **train: Any) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A committed baseline on the mirror slice `args` names (train's params changed by `train`), in a
    temporary folder removed afterwards, with a record's first figures: the settings and the
    seconds the baseline took."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        started = time.perf_counter()
        params = mirror_params(args)
        params["train"].update(train)
        repo = committed_baseline(root / "project", env, **params)
        yield repo, {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "source")},
                     "baseline_s": round(time.perf_counter() - started, 1)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
