"""What the inference API is told at start: its export, the limits on one request, batching and
drift. Kept free of the web stack so the CLI reads the defaults without loading it, and passed to
worker processes as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

MIB = 1024 * 1024


def mib(n_bytes: int) -> str:
    return f"{n_bytes / MIB:g} MiB"


@dataclass(frozen=True)
class Limits:
    max_files: int = 64  # images per request
    max_file_bytes: int = 10 * MIB  # per image; a 32x32 model gains nothing from larger uploads
    max_body_bytes: int = 32 * MIB
    # Decoded pixels per request: decoding costs time and memory by pixels, not by file size (a
    # 16-bit PNG of 9000x9000 zeros is a small file and 81 million pixels).
    max_pixels: int = 4096 * 4096
    head_timeout_s: float = 10.0
    body_timeout_s: float = 30.0


@dataclass(frozen=True)
class Batching:
    """Concurrent requests' images run through the model together, up to `max_batch` images; a batch
    waits up to `max_wait_ms` only for requests already being decoded, so a lone request never
    waits. `max_batch` 1 turns batching off: each request runs the model alone."""

    max_batch: int = 64
    max_wait_ms: float = 5.0


@dataclass(frozen=True)
class Drift:
    """/health turns "degraded" when the colours of the last `window` images sent stray from the
    export's test split by more than `threshold` (a Hellinger distance, 0..1); no verdict before
    `min_images` have arrived."""

    window: int = 256
    min_images: int = 64
    threshold: float = 0.4


@dataclass(frozen=True)
class Follow:
    """Serve the model version GTO assigns to `stage` in `repo`, and switch when the stage moves:
    every `poll_s` seconds origin's tags are fetched (when the repo has an origin) and read."""

    repo: str
    stage: str
    exports: str  # dvc.yaml's paths.exports, the folder read at each version's commit
    poll_s: float = 30.0
    version: str | None = None  # the version served at start


@dataclass(frozen=True)
class Settings:
    exports: str  # the export folder served
    git_rev: str | None = None  # the commit holding it, None when not known to be committed
    threads: int = 0  # ONNX Runtime threads per model call, 0: one per core
    limits: Limits = field(default_factory=Limits)
    batching: Batching = field(default_factory=Batching)
    drift: Drift = field(default_factory=Drift)
    follow: Follow | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        raw = json.loads(text)
        return cls(raw["exports"], raw["git_rev"], raw["threads"], Limits(**raw["limits"]),
                   Batching(**raw["batching"]), Drift(**raw["drift"]),
                   Follow(**raw["follow"]) if raw.get("follow") else None)
