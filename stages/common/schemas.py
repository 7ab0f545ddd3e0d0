"""Every params.yaml section's schema, and the registry of sections: light (no NumPy, Keras or
TensorFlow), so presets, the `--set` check, the gate and the tests read params without loading a
framework.

Every knob lives in params.yaml, so a schema has no defaults: a missing key is an error, not a
silent fallback that DVC would not see as a parameter. Constraints ride on the fields
(`knob(min=..., choices=...)`); `stages.common.params.parse_section` enforces them with "did you
mean" messages.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from dataclasses import dataclass
from typing import Any

from stages.common.errors import ConfigError

# The model zoo's names (builders of the same names live in stages/common/models.py).
# Height, width and channels of every image the pipeline prepares, trains on, exports and serves.
IMAGE_SHAPE = (32, 32, 3)

MODEL_NAMES = ("tutorial_cnn", "leaky_bn_cnn", "vgg_blocks", "bn_cnn", "gap_cnn", "resnet", "fast_vgg", "transfer")
OPTIMIZERS = ("adam", "adamw", "sgd", "nadam", "adagrad", "rmsprop")
SCHEDULES = ("constant", "step", "cosine", "onecycle", "plateau")
DISTRIBUTE = ("none", "mirrored")


def knob(
    *,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[Any, ...] | None = None,
    min_exclusive: bool = False,
) -> Any:
    """A required dataclass field with the range or choices it must respect."""
    return dataclasses.field(metadata={"min": min, "max": max, "min_exclusive": min_exclusive, "choices": choices})


# NumPy's and TensorFlow's seeds are unsigned 32-bit integers.
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class DownloadParams:
    source: str
    md5: str | None
    sha256: str | None
    classes: list[str] | None
    timeout_s: float = knob(min=1, max=86_400)

    def __post_init__(self) -> None:
        if not self.source.strip():
            raise ConfigError("params.yaml: 'download.source' is empty; give a URL, an archive or a folder")
        for name, length in (("md5", 32), ("sha256", 64)):
            digest = getattr(self, name)
            if digest is not None and (len(digest) != length or any(c not in "0123456789abcdefABCDEF" for c in digest)):
                raise ConfigError(f"params.yaml: 'download.{name}' is {digest!r}; it must be {length} hex digits, or null")
        classes = self.classes
        if classes is not None and (len(classes) < 2 or len(set(classes)) != len(classes)
                                    or not all(c.strip() for c in classes)):
            raise ConfigError(f"params.yaml: 'download.classes' is {self.classes!r}; list at least two distinct "
                                  "class names, or null to take the source's")


def smallest_class_size(val_fraction: float) -> int:
    """The fewest images per class that split into at least one training and one validation image
    (prepare rounds each class's validation share to the nearest integer)."""
    start = max(2, int(0.5 / val_fraction) - 1)
    return next(n for n in range(start, start + 100) if 1 <= round(n * val_fraction) <= n - 1)


@dataclass(frozen=True)
class PrepareParams:
    # > 0: validate checks the validation split and train monitors it.
    val_fraction: float = knob(min=0.0, max=0.9, min_exclusive=True)
    normalization: str = knob(choices=("standardize", "scale"))
    train_limit_per_class: int | None = knob(min=1)
    # A quick look evaluates and exports on fewer test images (every class keeps this many).
    test_limit_per_class: int | None = knob(min=1)
    convert_images: bool
    seed: int = knob(min=0, max=MAX_SEED)

    def __post_init__(self) -> None:
        limit = self.train_limit_per_class
        if limit is not None and limit < smallest_class_size(self.val_fraction):
            raise ConfigError(
                f"params.yaml: 'prepare.train_limit_per_class' {limit} with 'prepare.val_fraction' {self.val_fraction:g} "
                f"leaves a class without a training or a validation image; use at least "
                f"{smallest_class_size(self.val_fraction)}")


@dataclass(frozen=True)
class ExpectedPerClass:
    train: int = knob(min=1)
    test: int = knob(min=1)


@dataclass(frozen=True)
class ValidateParams:
    expected_per_class: ExpectedPerClass | None
    balance_tolerance: float = knob(min=0.0, max=1.0)
    min_pixel_std: float = knob(min=0.0, max=255.0)  # pixel units
    min_channel_std: float = knob(min=0.0, max=255.0, min_exclusive=True)


# train.augment.flip's word for airbench's flips (layers.AlternatingFlip, callbacks.FlipEpochs).
ALTERNATING_FLIPS = "alternating"


@dataclass(frozen=True)
class Augment:
    # true: each image mirrored at random; alternating: in every other epoch (airbench's)
    flip: bool | str = knob(choices=(False, True, ALTERNATING_FLIPS))
    crop_pad: int = knob(min=0, max=16)  # random translation by up to this many pixels, zero-padded
    rotation: float = knob(min=0.0, max=0.5)  # fraction of a full turn
    zoom: float = knob(min=0.0, max=0.5)
    contrast: float = knob(min=0.0, max=1.0)
    shear: float = knob(min=0.0, max=1.0)
    # nearest: crop_pad shifts by whole pixels (pad-and-crop, airbench's; +0.7 points at 4 epochs);
    # bilinear: by fractions of a pixel too, blurring the image (Keras' and ImageDataGenerator's)
    crop_interpolation: str = knob(choices=("nearest", "bilinear"))


@dataclass(frozen=True)
class TrainParams:
    model: str = knob(choices=MODEL_NAMES)
    # Per model, the keyword options of its builder (stages/common/models.py): switching
    # train.model never hands one model's options to another.
    arch: dict[str, dict[str, Any]]
    epochs: int = knob(min=1, max=10_000)
    batch_size: int = knob(min=1, max=65_536)
    optimizer: str = knob(choices=OPTIMIZERS)
    learning_rate: float = knob(min=0.0, max=10.0, min_exclusive=True)
    momentum: float = knob(min=0.0, max=1.0)  # sgd and rmsprop
    nesterov: bool  # sgd
    weight_decay: float = knob(min=0.0, max=1.0)  # decoupled, as the optimizer applies it
    bias_lr_scale: float = knob(min=0.0, max=1000.0, min_exclusive=True)  # sgd: BatchNorm offsets' step multiple
    schedule: str = knob(choices=SCHEDULES)
    warmup_epochs: float = knob(min=0.0, max=10_000)
    step_every: int = knob(min=1, max=10_000)  # step: epochs between drops; plateau: patience
    step_factor: float = knob(min=0.0, max=1.0, min_exclusive=True)
    label_smoothing: float = knob(min=0.0, max=0.5)
    augment: Augment
    early_stopping: int | None = knob(min=1, max=10_000)  # patience on val_loss, best weights restored
    ema: bool  # keep an exponential moving average of the weights and evaluate with it
    lookahead: bool  # airbench's lookahead: every 5 steps, pull the weights toward a slow copy
    # auto: float16 on a GPU, bfloat16 on a CPU that computes it natively (AVX512_BF16 or AMX),
    # float32 elsewhere (emulated bfloat16 is slower); true forces the mixed type, false float32.
    mixed_precision: bool | str = knob(choices=(False, True, "auto"))
    xla: bool
    # mirrored: tf.distribute.MirroredStrategy over this machine's GPUs (batch_size is the global batch)
    distribute: str = knob(choices=DISTRIBUTE)
    seed: int = knob(min=0, max=MAX_SEED)
    require_gpu: bool
    # The Optuna trial (STUDY/NUMBER) a sweep with a pruner runs this point for (stages/common/trial.py);
    # null outside such a sweep, and a params.yaml written before it existed may lack it.
    trial: str | None = None
    # onecycle: the epochs after which the learning rate, decayed to zero, rises again, each stretch
    # its own triangle; at a pruner's rungs, each decision then sees an annealed model, not one
    # caught at the peak. Null or empty: one cycle (a params.yaml older than it may lack it).
    restarts: list[int] | None = None

    def __post_init__(self) -> None:
        # Each model's own options are checked against its builder by models.check_builds.
        for model, options in self.arch.items():
            if model not in MODEL_NAMES:
                hint = difflib.get_close_matches(str(model), MODEL_NAMES, n=1)
                fix = f"did you mean '{hint[0]}'?" if hint else f"models: {', '.join(MODEL_NAMES)}"
                raise ConfigError(f"params.yaml: 'train.arch.{model}' names no model; {fix}")
            if not isinstance(options, dict):
                raise ConfigError(f"params.yaml: 'train.arch.{model}' must be a mapping of options, got {options!r}")
        self._check_restarts()

    def _check_restarts(self) -> None:
        restarts = self.restarts or []
        if restarts and self.schedule != "onecycle":
            raise ConfigError(f"params.yaml: 'train.restarts' {restarts} restarts the onecycle schedule, not "
                              f"{self.schedule}; set train.schedule to onecycle, or train.restarts to []")
        inside = all(0 < epoch < self.epochs for epoch in restarts)
        if not inside or any(a >= b for a, b in itertools.pairwise(restarts)):
            raise ConfigError(f"params.yaml: 'train.restarts' is {restarts}; list epochs in increasing order, each "
                              f"between 1 and {self.epochs - 1} (train.epochs is {self.epochs}), or []")

    @property
    def options(self) -> dict[str, Any]:
        """The builder options of the model being trained (its defaults where arch has none)."""
        return self.arch.get(self.model) or {}

    def warmup_steps(self, steps_per_epoch: int) -> int:
        """Warmup within the run: a warmup as long as the run would never reach its decay."""
        return int(min(self.warmup_epochs, self.epochs / 2) * steps_per_epoch)

    def restart_steps(self, steps_per_epoch: int) -> list[int]:
        return [epoch * steps_per_epoch for epoch in self.restarts or []]

    def recorded(self) -> dict[str, Any]:
        """The params as the run records them; a run outside a sweep records no trial."""
        params = dataclasses.asdict(self)
        return params if self.trial else {k: v for k, v in params.items() if k != "trial"}

    def warnings(self) -> list[str]:
        out = []
        if self.schedule in ("cosine", "onecycle") and self.warmup_epochs > self.epochs / 2:
            out.append(f"train.warmup_epochs {self.warmup_epochs:g} leaves no decay in {self.epochs} epoch(s) of "
                       f"{self.schedule}; warming up for {self.epochs / 2:g} epochs instead (half the run)")
        if self.bias_lr_scale != 1 and self.optimizer != "sgd":
            out.append(f"train.bias_lr_scale {self.bias_lr_scale:g} applies to sgd only; {self.optimizer} "
                       "ignores it (set it to 1 to silence this)")
        return out


@dataclass(frozen=True)
class EvaluateParams:
    # "val" while tuning keeps the test split untouched until the final evaluation.
    split: str = knob(choices=("test", "val"))
    batch_size: int = knob(min=1, max=65_536)
    tta_flip: bool
    tta_translate: int = knob(min=0, max=4)  # pixels; 0: no translated views


EXPORT_FORMATS = ("saved_model", "onnx")


@dataclass(frozen=True)
class ExportParams:
    formats: list[str]
    onnx_opset: int = knob(min=13, max=18)  # 18: the newest tf2onnx 1.17 writes
    # The check against Keras on the test split: an export beyond either limit is not written.
    max_probability_diff: float = knob(min=0.0, max=1.0)
    min_top1_agreement: float = knob(min=0.0, max=1.0)
    batch_size: int = knob(min=1, max=65_536)

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in EXPORT_FORMATS]
        if unknown or not self.formats or len(set(self.formats)) != len(self.formats):
            raise ConfigError(f"params.yaml: 'export.formats' is {self.formats!r}; list each of "
                              f"{', '.join(EXPORT_FORMATS)} at most once (at least one)")


@dataclass(frozen=True)
class ReportParams:
    misclassified: int = knob(min=0, max=100)
    samples_per_class: int = knob(min=1, max=20)
    dpi: int = knob(min=50, max=300)


@dataclass(frozen=True)
class GateParams:
    max_accuracy_drop: float = knob(min=0.0, max=1.0)
    max_recall_drop: float = knob(min=0.0, max=1.0)
    require_significance: bool  # fail only drops McNemar finds significant (p < pipelines/statistics.py's ALPHA)


# Each params.yaml section and its schema; a section's name is also its stage's (gate: the
# quality gate's thresholds, read by `cifar10-pipeline gate`).
SECTIONS: dict[str, type] = {
    "download": DownloadParams,
    "prepare": PrepareParams,
    "validate": ValidateParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "export": ExportParams,
    "report": ReportParams,
    "gate": GateParams,
}
