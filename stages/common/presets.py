"""Presets: named params sets (presets/*.yaml) written into params.yaml by one command.

A preset is `presets/_base.yaml` with the preset's values on top, and applying it writes every
one of those keys into params.yaml: DVC then sees each effective value as a parameter
(`dvc params diff` and `dvc exp show` tell two presets apart) and nothing of a previous preset
survives. Keys a preset does not cover (data source, seeds, report layout) are left alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"


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
        from stages.common.errors import ConfigError

        raise ConfigError(f"no preset '{name}'; available: {', '.join(available(presets_dir))}")
    from stages.common.params import read_yaml_file

    base = read_yaml_file(presets_dir / "_base.yaml")
    preset = read_yaml_file(path) or {}
    return {section: _merge(base.get(section, {}), preset.get(section, {})) if section in base else preset[section]
            for section in {**base, **preset}}


def apply(params_file: Path, name: str, presets_dir: Path = PRESETS_DIR) -> dict[str, dict[str, Any]]:
    """Write the preset into params_file (comments kept) after checking it against the schema."""
    from stages.common.params import check_sections, read_params, update_params_file

    values = resolve(name, presets_dir)
    plain = read_params(params_file)
    for section, keys in values.items():
        plain[section].update(keys)
    check_sections(plain, values)  # a bad preset never reaches params.yaml
    # A changed line's comment described the previous recipe's value: it goes with it.
    update_params_file(params_file, {f"{section}.{key}": value for section, keys in values.items()
                                     for key, value in keys.items()}, keep_comments=False)
    return values
