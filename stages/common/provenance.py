"""Where an artifact came from: the code revision, the model file's hash (DVC's md5 of a file) and
the CPU it was made on, written into the report's model card, the export's signature.json, the
train stage's run_info.json and the measurement records alike."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from stages.common.errors import DataError


def file_md5(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path} not found; run `dvc repro train` first")
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


def code_revision() -> str:
    """The git commit the stages ran from, marked when stage code had uncommitted changes."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "stages", "dvc.yaml"], capture_output=True, text=True)
    return head.stdout.strip() + (" + uncommitted changes to stages/ or dvc.yaml" if dirty.stdout.strip() else "")


# The CPU features whose presence changes what training should do: bfloat16 pays off only where
# the CPU computes it natively (AVX512_BF16 or AMX); elsewhere TensorFlow emulates it, slower.
BF16_NATIVE = ("avx512_bf16", "amx_bf16")
ISA_FLAGS = ("avx2", "avx512f", *BF16_NATIVE)


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, object]:
    """The CPU's model name and which of ISA_FLAGS it has (Linux; unknown elsewhere)."""
    if not cpuinfo.is_file():
        return {"model": "unknown", "isa": []}
    first_cpu = cpuinfo.read_text().split("\n\n", 1)[0]
    fields = {key.strip(): value.strip() for key, _, value in
              (line.partition(":") for line in first_cpu.splitlines())}
    flags = fields.get("flags", "").split()
    return {"model": fields.get("model name", "unknown"), "isa": [flag for flag in ISA_FLAGS if flag in flags]}
