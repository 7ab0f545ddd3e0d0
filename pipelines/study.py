"""A sweep's search and its Optuna study: the points a grid or a random search draws, where the
study is kept and which search it holds. No Prefect here: the CLI checks a sweep's name against
its study before the flow starts."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from stages.common.errors import ConfigError, TransientError
from stages.common.trial import pruner_of, study_journal


def study_storage(repo: Path, name: str, url: str | None) -> Any:
    """Where the sweep's study lives: the database `url` names (e.g. the team's PostgreSQL), or by
    default a journal file in the project beside the sweep's table, safe for several processes."""
    if url:
        return url
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = study_journal(repo, name)
    journal.parent.mkdir(exist_ok=True)
    return JournalStorage(JournalFileBackend(str(journal)))


def _values(spec: Any) -> list[Any]:
    if isinstance(spec, list):
        return spec
    if isinstance(spec, dict) and "choice" in spec:
        return list(spec["choice"])
    raise ConfigError(f"a grid needs a list of values (or {{choice: [...]}}), got {spec!r}")


def _draw(spec: Any, rng: np.random.Generator) -> Any:
    if isinstance(spec, list):
        return spec[rng.integers(len(spec))]
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"unknown search space entry {spec!r}; use a list, choice, uniform, log_uniform or int_uniform")
    (kind, args), = spec.items()
    if kind == "choice":
        return args[rng.integers(len(args))]
    if kind == "uniform":
        return float(rng.uniform(args[0], args[1]))
    if kind == "log_uniform":
        return float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
    if kind == "int_uniform":
        return int(rng.integers(args[0], args[1] + 1))
    raise ConfigError(f"unknown search space kind '{kind}'; use choice, uniform, log_uniform or int_uniform")


def sample_points(space: dict[str, Any], kind: str, n: int, seed: int) -> list[dict[str, Any]]:
    """The sweep's points: the full grid, or `n` seeded random draws."""
    if kind == "grid":
        keys = list(space)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(_values(space[k]) for k in keys))]
    if kind != "random":
        raise ConfigError(f"sweep kind '{kind}' is not grid, random or tpe")
    rng = np.random.default_rng(seed)
    return [{k: _draw(v, rng) for k, v in space.items()} for _ in range(n)]


def optuna_distributions(space: dict[str, Any]) -> dict[str, Any]:
    """The search space as Optuna distributions (the same entries random search draws from)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, spec in space.items():
        if isinstance(spec, list):
            out[key] = CategoricalDistribution(spec)
            continue
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"unknown search space entry {spec!r}; use a list, choice, uniform, log_uniform or int_uniform")
        (kind, args), = spec.items()
        makers = {"choice": lambda a: CategoricalDistribution(a), "uniform": lambda a: FloatDistribution(a[0], a[1]),
                  "log_uniform": lambda a: FloatDistribution(a[0], a[1], log=True),
                  "int_uniform": lambda a: IntDistribution(a[0], a[1])}
        if kind not in makers:
            raise ConfigError(f"unknown search space kind '{kind}'; use choice, uniform, log_uniform or int_uniform")
        out[key] = makers[kind](args)
    return out


@contextlib.contextmanager
def opening(storage: Any) -> Iterator[None]:
    """A storage URL that cannot be used is the user's to fix (exit 2); a database that does not
    answer may answer later (exit 75). The URL's password stays out of the message."""
    from sqlalchemy.exc import ArgumentError, OperationalError

    parts = urlsplit(storage) if isinstance(storage, str) else None
    where = f"{parts.scheme}://{parts.hostname or ''}{parts.path}" if parts else "(the journal file)"
    try:
        yield
    except (ArgumentError, ImportError, ValueError) as err:
        raise ConfigError(f"--storage {where}: {str(err).splitlines()[0].rstrip('.')}; give an Optuna storage URL "
                          "(sqlite:///FILE, postgresql://USER:PASSWORD@HOST/DB with its driver installed)") from None
    except OperationalError as err:
        if isinstance(storage, str) and storage.startswith("sqlite"):
            raise ConfigError(f"--storage {where}: {err.orig}; its folder must exist and be writable") from None
        raise TransientError(f"the sweep's study database {where} cannot be reached ({err.orig}); "
                             "check that it is up and rerun") from None


def search_of(kind: str, space: dict[str, Any], seed: int, n: int, pruner: Any = None) -> dict[str, Any]:
    """What makes a sweep the same search when it is rerun under its name (as JSON reads it back);
    a TPE search may be asked for more points. The pruner is kept here too: Optuna's storage does
    not keep one, and each point's training rebuilds it from this (stages/common/trial.py)."""
    search = {"kind": kind, "space": space, "seed": seed, **({} if kind == "tpe" else {"n": n}),
              **({"pruner": pruner} if pruner is not None else {})}
    return json.loads(json.dumps(search))


def check_search(storage: Any, name: str, search: dict[str, Any]) -> None:
    """Refuse to resume a study under `name` that holds another search."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with opening(storage):
            started = optuna.load_study(study_name=name, storage=storage).user_attrs.get("search")
    except KeyError:  # no such study: a new sweep
        return
    if started is not None and started != search:
        differ = [key for key in ("kind", "space", "seed", "n", "pruner") if started.get(key) != search.get(key)]
        verb = "differs" if len(differ) == 1 else "differ"
        raise ConfigError(f"sweep '{name}' was started with another search (its {', '.join(differ)} {verb}); rerun that "
                          f"search to resume it, or give this one another --name")


def open_study(storage: Any, name: str, search: dict[str, Any], points: list[dict[str, Any]]) -> Any:
    """The sweep's study, created with a grid's or random search's points queued in it, or loaded
    to resume when it exists; a study of another search under that name is refused."""
    import optuna

    check_search(storage, name, search)
    seed = search["seed"]
    if search["kind"] == "tpe":
        # Several trials may be in flight: the constant liar counts each as a poor result until it ends, so
        # the next point is drawn away from them rather than beside them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    with opening(storage):
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, direction="maximize",
                                    pruner=pruner_of(search.get("pruner")) or optuna.pruners.NopPruner(),
                                    load_if_exists=True)
    if "search" not in study.user_attrs:
        study.set_user_attr("search", search)
        for point in points:
            study.enqueue_trial({}, user_attrs={"point": point})
    return study
