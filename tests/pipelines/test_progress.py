"""The train stage's progress read from DVCLive's files as they are written."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import yaml

from pipelines.progress import Epoch, Watcher, read_epoch


def write_epoch(folder, step: int, epochs: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump({"epochs": epochs, "model": "fast_vgg"}))
    (folder / "metrics.json").write_text(json.dumps({"train": {"loss": 1.5 - step / 10, "epoch_seconds": 30.0},
                                                     "eval": {"accuracy": 0.5 + step / 10}, "step": step}))


def test_an_epoch_is_read_with_its_metrics_and_the_time_left(tmp_path):
    started = time.time() - 1
    assert read_epoch(tmp_path, started) is None  # nothing written yet
    write_epoch(tmp_path, 1)
    epoch = read_epoch(tmp_path, started)
    assert epoch == Epoch(2, 4, 1.4, 0.6, 30.0) and epoch.percent == 50.0
    assert epoch.describe() == "train: epoch 2/4, loss 1.4000, val_accuracy 0.6000, about 60 s left"


def test_files_of_an_earlier_run_are_not_read(tmp_path):
    write_epoch(tmp_path, 3)
    old = time.time() - 3600
    for name in ("params.yaml", "metrics.json"):
        os.utime(tmp_path / name, (old, old))
    assert read_epoch(tmp_path, time.time() - 10) is None
    (tmp_path / "metrics.json").write_text("{half")  # caught while DVCLive writes it
    assert read_epoch(tmp_path, old - 1) is None


def test_the_watcher_reports_each_new_epoch_once_and_the_last_one_however_short_the_run(tmp_path):
    seen: list[Epoch] = []
    warnings: list[str] = []

    def wait_for(reports: int) -> None:
        deadline = time.monotonic() + 30
        while len(seen) < reports and time.monotonic() < deadline:
            time.sleep(0.02)

    with Watcher(tmp_path, time.time() - 1, seen.append, warnings.append, every_s=0.05):
        write_epoch(tmp_path, 0)
        wait_for(1)
        write_epoch(tmp_path, 1)
        wait_for(2)
        time.sleep(0.2)  # looks that find nothing new report nothing
        write_epoch(tmp_path, 2)  # the stage ends before the next look
    assert [e.done for e in seen] == [1, 2, 3] and warnings == []


def diverged_epoch(folder) -> None:
    """An epoch as DVCLive itself writes it when training diverged: nan and inf become strings."""
    from dvclive import Live

    with Live(str(folder), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        live.log_params({"epochs": 3})
        live.log_metric("train/loss", float("nan"))
        live.log_metric("train/epoch_seconds", float("inf"))
        live.log_metric("eval/accuracy", 0.1)
        live.next_step()


def test_a_diverged_epoch_is_described_not_a_crash(tmp_path):
    diverged_epoch(tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["train"]["loss"] == "nan"  # DVCLive's own way
    epoch = read_epoch(tmp_path, time.time() - 60)
    assert epoch.describe() == "train: epoch 1/3, loss nan, val_accuracy 0.1000"


@pytest.fixture
def thread_errors(monkeypatch):
    """Exceptions that end a thread (each would print a traceback into the run's output)."""
    caught: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: caught.append(args.exc_value))
    return caught


def test_a_nan_epoch_is_reported_once(tmp_path, thread_errors):
    seen: list[Epoch] = []
    with Watcher(tmp_path, time.time() - 60, seen.append, pytest.fail, every_s=0.02):
        diverged_epoch(tmp_path)
        time.sleep(0.3)
    assert [e.done for e in seen] == [1] and thread_errors == []


def test_a_report_that_fails_ends_the_updates_in_one_warning(tmp_path, thread_errors):
    calls: list[Epoch] = []
    warnings: list[str] = []

    def report(epoch: Epoch) -> None:
        calls.append(epoch)
        raise ConnectionError("the Prefect API stopped answering")

    with Watcher(tmp_path, time.time() - 60, report, warnings.append, every_s=0.02):
        write_epoch(tmp_path, 0)
        time.sleep(0.2)
        write_epoch(tmp_path, 1)
        time.sleep(0.2)
    assert len(calls) == 1 and thread_errors == []
    assert warnings == ["training progress stopped updating: ConnectionError: the Prefect API stopped answering"]
