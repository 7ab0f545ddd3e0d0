"""The Optuna trial a sweep's point trains for: train reports its validation accuracy after each
epoch to the trial and stops early when the study's pruner says so.

A sweep with a pruner sets `train.trial` (STUDY/NUMBER) on each point it queues; without it, as
in every run outside such a sweep, training never loads Optuna. The study is found where the sweep
keeps it: the storage named by CIFAR10_STUDY_STORAGE (a database URL, or a journal file), else its
journal file in the project, which DVC's queue names in DVC_ROOT (points run in temporary copies).
The pruner is not kept in Optuna's storage, so the study records its spec (the sweep file's
`pruner:`) and each point rebuilds it with `pruner_of`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stages.common.errors import ConfigError, DataError
from stages.common.paths import COMPARISONS_DIR

TRIAL_KEY = "train.trial"
STORAGE_ENV = "CIFAR10_STUDY_STORAGE"
STUDY_DIR = COMPARISONS_DIR  # a sweep's table, page and (by default) its study
PRUNED_AT = "pruned_after_epoch"  # the trial's and the run's record of where its pruner stopped it
PRUNERS = ("median", "successive_halving", "hyperband")


def refuse_pruned_model(metrics: dict[str, Any], where: Path) -> None:
    """Export and report are for a model that trained to its end: evaluate records no figures of
    one its sweep's pruner stopped (`metrics` is what evaluate wrote, in `where`)."""
    if pruned_after := metrics.get(PRUNED_AT):
        raise DataError(f"{where} holds no evaluation: the model's training was pruned by its sweep after epoch "
                        f"{pruned_after}; set train.trial: null in params.yaml and run `dvc repro` to train it to the end")


def study_journal(root: Path, name: str) -> Path:
    """The journal file that keeps a sweep's study by default."""
    return root / STUDY_DIR / f"{name}.journal"


def pruner_of(spec: Any) -> Any:
    """Optuna's pruner for a sweep file's `pruner:` (a name, or {name: {option: value}}); None for none."""
    import optuna

    if spec is None:
        return None
    name, options = (spec, {}) if isinstance(spec, str) else (next(iter(spec.items())) if isinstance(spec, dict)
                                                             and len(spec) == 1 else (None, None))
    makers = {"median": optuna.pruners.MedianPruner, "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
              "hyperband": optuna.pruners.HyperbandPruner}
    if name not in makers or not isinstance(options, dict):
        raise ConfigError(f"pruner {spec!r} is not one of {', '.join(PRUNERS)} (a name, or {{name: {{options}}}})")
    try:
        return makers[name](**options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"pruner {name}: {err}; see Optuna's {makers[name].__name__} for its options") from None


def _storage(study: str) -> Any:
    if url := os.environ.get(STORAGE_ENV):
        if "://" in url:
            return url
        journal = Path(url)
    else:
        journal = study_journal(Path(os.environ.get("DVC_ROOT", ".")), study)
    if not journal.is_file():
        raise ConfigError(f"train.trial names study '{study}', but its journal {journal} does not exist; a sweep sets "
                          "train.trial, remove it from params.yaml to train outside one")
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(journal)))


def open_trial(ref: str) -> Any | None:
    """The running trial `ref` (STUDY/NUMBER) names, with its study's pruner; None when it has
    ended (a promoted point's params still name it): training then runs to its end."""
    import optuna
    from optuna.trial import TrialState

    study_name, _, number = ref.rpartition("/")
    if not study_name or not number.isdigit():
        raise ConfigError(f"train.trial '{ref}' is not STUDY/NUMBER; a sweep sets it, remove it to train outside one")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(study_name)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise ConfigError(f"train.trial: there is no study '{study_name}'; remove train.trial to train outside a sweep") from None
    # Optuna's default for a loaded study would be its MedianPruner, whatever the sweep chose.
    study.pruner = pruner_of(study.user_attrs.get("search", {}).get("pruner")) or optuna.pruners.NopPruner()
    try:
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, int(number))
    except KeyError:
        raise ConfigError(f"train.trial: study '{study_name}' has no trial {number}") from None
    if study._storage.get_trial(trial_id).state != TrialState.RUNNING:
        return None
    return optuna.trial.Trial(study, trial_id)
