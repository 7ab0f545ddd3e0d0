"""Sweeps: a grid or a random search over params, each point a queued DVC experiment.

Points run through DVC's own queue (`dvc exp run --queue`, then `--run-all -j N`), each in its own
temporary workspace, so every point stays in `dvc exp show`, its outputs in DVC's cache, and any
one can be promoted with `dvc exp branch` / `dvc exp apply` (`cifar10-pipeline promote`).
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipelines.compare import experiments_table, safe_name
from pipelines.dvcrepo import dvc, dvc_executable, set_arg
from pipelines.flow import check_overrides
from stages.common.errors import CommandFailed, ConfigError

OUT_DIR = Path("comparisons")


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
        raise ConfigError(f"sweep kind '{kind}' is not grid or random")
    rng = np.random.default_rng(seed)
    return [{k: _draw(v, rng) for k, v in space.items()} for _ in range(n)]


def _override(key: str, value: Any) -> str:
    # Six significant digits keep a random draw's experiment params readable.
    return set_arg(key, float(f"{value:.6g}") if isinstance(value, float) else value)


def _queue_failures(repo: Path) -> set[str]:
    import subprocess

    status = subprocess.run([dvc_executable(), "queue", "status"], cwd=repo, capture_output=True, text=True).stdout
    return {line.split()[1] for line in status.splitlines() if "Failed" in line and len(line.split()) > 1}


@flow(name="cifar10-sweep", log_prints=True)
def sweep(
    repo_dir: str = ".",
    space: dict[str, Any] | None = None,
    kind: str = "random",
    n: int = 4,
    seed: int = 0,
    jobs: int = 1,
    name: str | None = None,
    sort_by: str = "accuracy",
) -> dict[str, Any]:
    """Queue one DVC experiment per point, run them (`jobs` at a time), then rank them."""
    logger = get_run_logger()
    repo = Path(repo_dir).resolve()
    points = sample_points(space or {}, kind, n, seed)
    for point in points:  # a point the schema refuses would only fail later, in its own run
        check_overrides(repo / "params.yaml", point)
    name = safe_name(name or time.strftime("sweep-%Y%m%d-%H%M%S"))
    names = []
    for i, point in enumerate(points, start=1):
        exp = f"{name}-{i}"
        sets = [arg for key, value in point.items() for arg in ("-S", _override(key, value))]
        dvc(repo, "exp", "run", "--queue", "--name", exp, *sets)
        names.append(exp)
        logger.info(f"queued {exp}: {point}")
    started = time.perf_counter()
    try:
        dvc(repo, "exp", "run", "--run-all", "--jobs", str(jobs))
    except CommandFailed as err:  # failed points are found below, each by its own status
        logger.warning(f"dvc exp run --run-all: {err}")
    logger.info(f"ran {len(points)} points in {time.perf_counter() - started:.0f} s with {jobs} job(s)")

    table = experiments_table(repo, sort_by=sort_by)
    mine = table[table["name"].isin(names)] if not table.empty else table
    finished = {row["name"]: row for row in mine.to_dict("records")
                if row.get("status") == "ok" and pd.notna(row.get("accuracy"))}
    failed = sorted((set(names) - set(finished)) | (_queue_failures(repo) & set(names)))
    points_by_name = dict(zip(names, points))
    rows = [{"name": n_, **points_by_name[n_], **{k: r.get(k) for k in ("accuracy", "f1_macro", "loss")}, "status": "ok"}
            for n_, r in finished.items() if n_ not in failed]
    rows += [{"name": n_, **points_by_name[n_], "status": "failed"} for n_ in failed]
    for n_ in failed:
        logger.error(f"{n_} failed: {points_by_name[n_]}; rerun it alone with `dvc exp run` and these -S values")
    result = pd.DataFrame(rows)
    if "accuracy" in result:
        result = result.sort_values("accuracy", ascending=False, na_position="last").reset_index(drop=True)
    best = result.iloc[0].to_dict() if not result.empty and result.iloc[0]["status"] == "ok" else None

    out = repo / OUT_DIR
    out.mkdir(exist_ok=True)
    result.to_csv(out / f"{name}.csv", index=False)
    summary = [f"# Sweep {name}", "", f"{len(points)} points ({kind}), {len(failed)} failed.", "",
               result.to_markdown(index=False)]
    if best:
        summary += ["", (f"Best: `{best['name']}` accuracy {best.get('accuracy')}; "
                        f"promote it with `cifar10-pipeline promote {best['name']} --branch {best['name']}`")]
    (out / f"{name}.md").write_text("\n".join(summary) + "\n")
    create_table_artifact(result.astype(object).where(result.notna(), None).to_dict("records"),
                          key=safe_name(f"sweep-{name}").lower(), description=f"Sweep {name}")
    create_markdown_artifact("\n".join(summary), key="cifar10-sweep", description="Latest sweep")
    return {"name": name, "points": len(points), "failed": failed, "best": best, "table": str(out / f"{name}.csv")}


def load_sweep_config(path: Path) -> dict[str, Any]:
    from stages.common.params import load_yaml

    if not path.is_file():
        raise ConfigError(f"{path} not found; pass a search space file (see sweeps/seed002.yaml)")
    try:
        config = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML ({str(err).splitlines()[0]}); fix the syntax") from None
    if not isinstance(config.get("space"), dict) or not config["space"]:
        raise ConfigError(f"{path} needs a 'space:' mapping of param -> values (see sweeps/seed002.yaml)")
    return config
