"""The params a run reads: params.yaml, a preset (presets/*.yaml) and `--set` overrides on top,
checked in full before anything is written or run (train's model builds).

Stages read params.yaml alone (stages/common/params.py); this module is for what starts runs: the
CLI, the flow, sweeps and the benchmarks.

A preset is `presets/_base.yaml` with the preset's values on top, and applying it writes every
one of those keys into params.yaml: DVC then sees each effective value as a parameter
(`dvc params diff` and `dvc exp show` tell two presets apart) and nothing of a previous preset
survives. Keys a preset does not cover (data source, seeds, report layout) are left alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stages.common.errors import ConfigError, native_stderr_silenced
from stages.common.params import parse_section, read_params, read_yaml_file, update_params_file, with_overrides
from stages.common.schemas import SECTIONS, TrainParams

PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"


def presets_dir(repo: Path) -> Path:
    """The project's own presets/ when it has one (a non-editable install ships none), else ours."""
    return repo / "presets" if (repo / "presets" / "_base.yaml").is_file() else PRESETS_DIR


def available(presets_dir: Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in presets_dir.glob("*.yaml") if not p.stem.startswith("_"))


def summary(name: str, presets_dir: Path = PRESETS_DIR) -> str:
    """The first sentence of the preset file's opening comment: what the recipe is."""
    opening = []
    for line in (presets_dir / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        opening.append(line.lstrip("# ").strip())
    first = " ".join(opening).split(". ")[0].rstrip(".")
    return first if len(first) <= 90 else first[:87].rstrip() + "..."


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        # arch and augment are replaced whole: a preset's architecture is its own, not a blend.
        out[key] = _merge(base[key], value) if isinstance(value, dict) and key in ("train", "prepare", "evaluate") \
            and isinstance(base.get(key), dict) else value
    return out


def resolve(name: str, presets_dir: Path = PRESETS_DIR) -> dict[str, dict[str, Any]]:
    path = presets_dir / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset '{name}'; available: {', '.join(available(presets_dir))}")
    base = read_yaml_file(presets_dir / "_base.yaml")
    preset = read_yaml_file(path) or {}
    return {section: _merge(base.get(section, {}), preset.get(section, {})) if section in base else preset[section]
            for section in {**base, **preset}}


def effective_params(params_file: Path, preset: str | None = None, overrides: dict[str, Any] | None = None,
                     presets_dir: Path = PRESETS_DIR) -> dict[str, Any]:
    """params.yaml, then a preset's values, then dotted overrides on top: what a run of them reads.
    The one builder of a run's params, for the CLI, the flow and the benchmarks."""
    params = read_params(params_file)
    for section, keys in (resolve(preset, presets_dir) if preset else {}).items():
        params.setdefault(section, {}).update(keys)
    return with_overrides(params, overrides or {})


def apply(params_file: Path, name: str, presets_dir: Path = PRESETS_DIR) -> dict[str, dict[str, Any]]:
    """Write the preset into params_file (comments kept) after checking it against the schema."""
    values = resolve(name, presets_dir)
    check_sections(effective_params(params_file, name, presets_dir=presets_dir), values)  # a bad preset never reaches params.yaml
    # A changed line's comment described the previous recipe's value: it goes with it.
    update_params_file(params_file, {f"{section}.{key}": value for section, keys in values.items()
                                     for key, value in keys.items()}, keep_comments=False)
    return values


def check_sections(params: dict[str, Any], names: Iterable[str], build: Iterable[str] = ()) -> None:
    """Check the named sections of a params mapping (types, ranges, choices), raising ConfigError
    with the first problem; for train, when named in `build` too, also that its model builds."""
    for name in names:
        if name not in SECTIONS:
            continue
        checked = parse_section(params.get(name), SECTIONS[name], name)
        if isinstance(checked, TrainParams) and name in build:
            check_train_section(checked, local=False)  # where it trains is the flow's to say


def check_overrides(params_file: Path, overrides: dict[str, Any], values: bool = True) -> None:
    """params.yaml as it stands with the overrides on top, checked before anything is written or
    run: an override whose key params.yaml lacks is refused and, with `values`, every section is
    checked against its schema (a key typed by hand included), the overridden train section down
    to its model building."""
    data = with_overrides(read_params(params_file), overrides, values)
    if not values:
        return
    overridden = {dotted.split(".")[0] for dotted in overrides}
    try:
        check_sections(data, [name for name in SECTIONS if name in data], build=overridden)
    except ConfigError as err:
        if not overrides:
            raise
        raise ConfigError(f"{err} (with --set {', '.join(f'{k}={v!r}' for k, v in overrides.items())})") from None


def check_train_section(params: TrainParams, local: bool) -> None:
    """models.check_trainable, with Keras and TensorFlow imported quietly for it."""
    with native_stderr_silenced():
        from stages.common.models import check_trainable

        check_trainable(params, local)
