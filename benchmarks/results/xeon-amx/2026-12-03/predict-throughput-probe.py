"""`cifar10-pipeline predict` on 10,000 test images (a folder of PNGs, the same as tar.gz and zip)
against bare ONNX Runtime on the same model at the same batch size, in turns; 30,000 at once for
the memory bound.

    python predict-throughput-probe.py EXPORT FOLDER TAR_GZ ZIP
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from api_latency import bare_onnx_runtime

BIN = Path(sys.executable).parent


def predict(export: Path, *sources: str) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run([str(BIN / "cifar10-pipeline"), "predict", *sources, "--model", str(export),
                             "--out", "/tmp/predict-probe.csv", "--no-progress"], capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows = len(Path("/tmp/predict-probe.csv").read_text().splitlines()) - 1
    return {"sources": [Path(s).name for s in sources], "rc": result.returncode, "images": rows,
            "wall_s": round(wall, 2), "images_per_s": round(rows / wall, 1),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
            "max_rss_mib_of_any_child_so_far": round(after.ru_maxrss / 1024, 1)}


def main() -> None:
    export, folder, tar, zipped = Path(sys.argv[1]), *sys.argv[2:5]
    runs = []
    for source in (folder, tar, zipped):
        runs.append({"bare_onnx_runtime": bare_onnx_runtime(export, 256)})
        runs.append(predict(export, source))
    runs.append(predict(export, folder, tar, zipped))
    runs.append(predict(export, f"{folder}/00000.png"))
    print(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
