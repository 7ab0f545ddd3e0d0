"""The training recipe: train's params, its learning-rate schedules, optimizers and the compiled
model, in backend-agnostic Keras (no TensorFlow import), so the same recipe trains under
TensorFlow in the train stage and under JAX on a GPU machine (benchmarks/gpu_recipe.py).
"""

from __future__ import annotations

import itertools

import keras
import numpy as np

from stages.common.callbacks import FlipEpochs, Lookahead
from stages.common.errors import ConfigError
from stages.common.layers import all_layers, augmentation, fit_whitening
from stages.common.models import build_model
from stages.common.provenance import BF16_NATIVE
from stages.common.schemas import ALTERNATING_FLIPS, TrainParams


@keras.saving.register_keras_serializable(package="cifar10_pipeline")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to the peak, then linear decay to zero (the fast trainers' triangle). With
    `restarts` (steps), each stretch between them is such a triangle, warming up for the same
    share of its length."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, restarts: list[int] | tuple[int, ...] = ()):
        self.peak, self.warmup_steps, self.total_steps = peak, warmup_steps, total_steps
        self.restarts = list(restarts)

    def _triangle(self, step, start: int, end: int, warmup: float):
        up = (step - start) / max(warmup, 1)
        down = (end - step) / max(end - start - warmup, 1)
        return self.peak * keras.ops.clip(keras.ops.minimum(up, down), 0.0, 1.0)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        if not self.restarts:
            return self._triangle(step, 0, self.total_steps, self.warmup_steps)
        bounds = [0, *self.restarts, self.total_steps]
        lr = keras.ops.zeros_like(step)
        for start, end in itertools.pairwise(bounds):
            warmup = self.warmup_steps * (end - start) / self.total_steps
            inside = keras.ops.logical_and(step >= start, step < end)
            lr = lr + keras.ops.where(inside, self._triangle(step, start, end, warmup), 0.0)
        return lr

    def get_config(self) -> dict:
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "restarts": self.restarts}


def precision_policy(setting: bool | str, gpu: bool, isa: list[str], onednn_max_isa: str | None = None) -> str:
    """The Keras dtype policy `train.mixed_precision` asks for on this device (on the CPU,
    mixed_bfloat16 covers the matmul layers only: see `apply_precision`). `onednn_max_isa` is
    ONEDNN_MAX_CPU_ISA: a cap below bfloat16 leaves oneDNN without its bfloat16 kernels, and
    TensorFlow then fails to build the layers' primitives."""
    mixed = "mixed_float16" if gpu else "mixed_bfloat16"
    if setting == "auto":
        bf16 = any(flag in isa for flag in BF16_NATIVE) and onednn_allows_bf16(onednn_max_isa)
        return mixed if gpu or bf16 else "float32"
    if setting and not gpu and not onednn_allows_bf16(onednn_max_isa):
        raise ConfigError(f"train.mixed_precision is true, but ONEDNN_MAX_CPU_ISA={onednn_max_isa} leaves oneDNN "
                          "no bfloat16 kernels; unset ONEDNN_MAX_CPU_ISA or set train.mixed_precision to auto")
    return mixed if setting else "float32"


# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) that still hold its native bfloat16 kernels.
ONEDNN_BF16_ISAS = ("ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
                    "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16",
                    "AVX10_2_512", "AVX10_2_512_AMX_2")


def onednn_allows_bf16(onednn_max_isa: str | None) -> bool:
    return not onednn_max_isa or onednn_max_isa.strip().upper() in ONEDNN_BF16_ISAS


# On the CPU, bfloat16 goes to the layers that multiply matrices, which AMX / AVX512_BF16 speed up;
# BatchNorm, activations and pooling stay float32: in bfloat16 they ran slower, not faster, and the
# whole step took the same time either way (docs/benchmarks.md).
MATMUL_LAYERS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
                 keras.layers.Dense)


def apply_precision(model: keras.Model, policy: str) -> None:
    """Give a model built under the float32 policy the CPU's mixed_bfloat16: its matmul layers
    compute in bfloat16 (weights stay float32), the rest in float32. Other policies are global."""
    if policy == "mixed_bfloat16":
        for layer in all_layers(model):
            if isinstance(layer, MATMUL_LAYERS):
                layer.dtype_policy = policy


def make_schedule(params: TrainParams, steps_per_epoch: int):
    lr, total = params.learning_rate, params.epochs * steps_per_epoch
    warmup = params.warmup_steps(steps_per_epoch)
    if params.schedule == "step":
        boundaries = list(range(params.step_every * steps_per_epoch, total, params.step_every * steps_per_epoch))
        values = [lr * params.step_factor**i for i in range(len(boundaries) + 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values) if boundaries else lr
    if params.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            lr if not warmup else 0.0, max(total - warmup, 1), warmup_target=lr if warmup else None,
            warmup_steps=warmup)
    if params.schedule == "onecycle":
        return OneCycle(lr, warmup, total, params.restart_steps(steps_per_epoch))
    return lr  # constant, and plateau (ReduceLROnPlateau lowers it)


@keras.saving.register_keras_serializable(package="cifar10_pipeline")
class BiasScaledSGD(keras.optimizers.SGD):
    """SGD whose BatchNorm offsets (`beta`) take steps `bias_lr_scale` times the learning rate
    (airbench: 64). Weight decay stays the same for every variable: Keras applies it apart from
    the step, as airbench's decoupled parametrisation does."""

    def __init__(self, bias_lr_scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.bias_lr_scale = bias_lr_scale

    def build(self, variables: list) -> None:
        super().build(variables)
        self._scaled = {i for i, v in enumerate(variables) if v.path.rsplit("/", 1)[-1] == "beta"}

    def update_step(self, gradient, variable, learning_rate):
        if self._get_variable_index(variable) in self._scaled:
            learning_rate = learning_rate * self.bias_lr_scale
        super().update_step(gradient, variable, learning_rate)

    def get_config(self) -> dict:
        return {**super().get_config(), "bias_lr_scale": self.bias_lr_scale}


def make_optimizer(params: TrainParams, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    lr = make_schedule(params, steps_per_epoch)
    common = {"learning_rate": lr, "weight_decay": params.weight_decay or None, "use_ema": params.ema}
    if params.optimizer == "adamw":  # AdamW takes the decay as a number, 0 included
        return keras.optimizers.AdamW(**{**common, "weight_decay": params.weight_decay})
    if params.optimizer == "sgd" and params.bias_lr_scale != 1:
        return BiasScaledSGD(params.bias_lr_scale, momentum=params.momentum, nesterov=params.nesterov, **common)
    if params.optimizer == "sgd":
        return keras.optimizers.SGD(momentum=params.momentum, nesterov=params.nesterov, **common)
    if params.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(momentum=params.momentum, **common)
    return {"adam": keras.optimizers.Adam, "nadam": keras.optimizers.Nadam,
            "adagrad": keras.optimizers.Adagrad}[params.optimizer](**common)


def compile_model(params: TrainParams, num_classes: int, normalization: dict, steps_per_epoch: int,
                  jit_compile: bool | str = "auto", train_images: np.ndarray | None = None,
                  precision: str = "float32") -> keras.Model:
    """The model as training fits it: seeded, built at `precision` (a `precision_policy`) and
    compiled. `train_images` fit a whitening layer (fast_vgg's `whiten`); only timing runs may
    leave it out."""
    keras.utils.set_random_seed(params.seed)
    keras.mixed_precision.set_global_policy("float32" if precision == "mixed_bfloat16" else precision)
    a = params.augment
    fill = float(np.mean(normalization["mean"]))
    augment = augmentation(a.flip, a.crop_pad, a.rotation, a.zoom, a.contrast, a.shear, params.seed, fill,
                           a.crop_interpolation)
    if keras.backend.backend() == "jax":
        # Keras marks its shift/rotate/zoom/shear layers jit-incompatible on every backend, which
        # TensorFlow's image-transform op earns; their JAX versions are plain jax.numpy, which
        # jax.jit traces. Left marked, the whole model runs op by op, about a hundred times slower.
        for layer in augment:
            layer.supports_jit = True
    model = build_model(params.model, num_classes, normalization["mean"], normalization["std"], params.options,
                        augment)
    apply_precision(model, precision)
    if train_images is not None:
        fit_whitening(model, train_images, normalization["mean"], normalization["std"])
    model.compile(
        optimizer=make_optimizer(params, steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model


def recipe_callbacks(params: TrainParams, monitor: str, steps_per_epoch: int) -> list[keras.callbacks.Callback]:
    """The callbacks the params ask for: alternating flips' epoch, plateau schedule, early stopping
    with best weights, lookahead."""
    out: list[keras.callbacks.Callback] = []
    if params.augment.flip == ALTERNATING_FLIPS:
        out.append(FlipEpochs())
    if params.lookahead:
        out.append(Lookahead(params.epochs * steps_per_epoch))
    if params.schedule == "plateau":
        out.append(keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=params.step_factor,
                                                     patience=params.step_every, min_lr=1e-6))
    if params.early_stopping:
        out.append(keras.callbacks.EarlyStopping(monitor=monitor, patience=params.early_stopping,
                                                 restore_best_weights=True))
    return out
