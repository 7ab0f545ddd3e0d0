"""Probe: does Keras 3's `fit` train under tf.distribute.MultiWorkerMirroredStrategy (two workers)?

keras-team/keras#20585 reports it broken since TensorFlow 2.16. This starts two local worker
processes with TF_CONFIG (127.0.0.1, one cluster), each building the project's compiled model
(stages/common/recipe.py) in the strategy's scope and fitting two epochs of synthetic data, and
records what each did: finished with its loss, failed with its error, or hung past the timeout.

    python benchmarks/multiworker_probe.py [--timeout 300] [--out multiworker_probe.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import json, os, sys, time
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
import numpy as np, tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy()
from stages.train import compiled_model, make_dataset
from stages.common.schemas import Augment, TrainParams
from tests import synthetic

params = TrainParams(model="tutorial_cnn", arch={}, epochs=2, batch_size=32, optimizer="sgd", learning_rate=0.02,
                     momentum=0.9, nesterov=True, weight_decay=0.0, bias_lr_scale=1.0, schedule="constant", warmup_epochs=0.0,
                     step_every=10, step_factor=0.5, label_smoothing=0.0, augment=Augment(False, 0, 0.0, 0.0, 0.0, 0.0, "bilinear"),
                     early_stopping=None, ema=False, lookahead=False, mixed_precision=False, xla=False, distribute="none", seed=1,
                     require_gpu=False)
classes = ["a", "b", "c"]
images, labels = synthetic.make_images(64, classes, seed=1)
norm = {"mean": [120.0] * 3, "std": [60.0] * 3}
started = time.perf_counter()
with strategy.scope():
    model = compiled_model(params, len(classes), norm, steps_per_epoch=6)
history = model.fit(make_dataset(images, labels, 32, shuffle_seed=1, num_classes=3), epochs=2, verbose=0)
print("PROBE " + json.dumps({"replicas": strategy.num_replicas_in_sync, "loss": history.history["loss"],
                             "seconds": round(time.perf_counter() - started, 1)}), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_error(stderr: str) -> str:
    """The last exception line, whitespace folded and its middle elided (a PerReplica value prints
    whole tensors)."""
    found = list(re.finditer(r"^(\w+(Error|Exception)): ", stderr, re.MULTILINE))
    text = " ".join(stderr[found[-1].start():].split()) if found else " ".join(stderr.split()[-40:])
    return text if len(text) <= 300 else f"{text[:110]} ... {text[-170:]}"


def probe(timeout_s: float) -> dict:
    workers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    procs = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(config), "TF_CPP_MIN_LOG_LEVEL": "2",
               "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    deadline = time.monotonic() + timeout_s
    results = []
    for index, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            results.append({"worker": index, "outcome": f"hung: no result after {timeout_s:g} s", "stderr": err[-1500:]})
            continue
        found = [line for line in out.splitlines() if line.startswith("PROBE ")]
        if proc.returncode == 0 and found:
            results.append({"worker": index, "outcome": "trained", **json.loads(found[-1][6:])})
        else:
            results.append({"worker": index, "outcome": f"failed (exit {proc.returncode})", "error": last_error(err)})
    return {"workers": results, "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--out", type=Path, default=Path("multiworker_probe.json"))
    args = parser.parse_args()
    import keras
    import tensorflow as tf

    result = {"tensorflow": tf.__version__, "keras": keras.__version__, **probe(args.timeout)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
