"""`cifar10-pipeline`: run, schedule, inspect and use the pipeline from one command."""

from __future__ import annotations

import difflib
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipelines.api.settings import MIB, Batching, Drift, Limits, Settings
from pipelines.predict import DEFAULT_TOP_K
from stages.common.errors import (
    INTERRUPTED,
    USAGE,
    ConfigError,
    PipelineError,
    error_exit,
    interrupt_on_sigterm,
)
from stages.common.params import parse_assignments
from stages.common.paths import COMPARISONS_DIR

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run, schedule and inspect the CIFAR-10 DVC pipeline through Prefect.")

DEFAULT_PORT = 4200


def require_repo(repo: Path) -> Path:
    repo = repo.resolve()
    if not (repo / "dvc.yaml").is_file():
        raise ConfigError(f"{repo} has no dvc.yaml; run from the project root or pass --repo")
    return repo


RepoOption = Annotated[Path, typer.Option("--repo", help="Project root (holds dvc.yaml).")]
ChampionOption = Annotated[str | None, typer.Option(
    "--champion", help="End with the quality gate against the version GTO assigns to this stage (e.g. prod).")]
TimeoutOption = Annotated[
    list[str] | None, typer.Option("--stage-timeout", help="Per-stage timeout: stage=seconds (repeatable).")
]


def parse_timeouts(pairs: list[str], repo: Path) -> dict[str, float]:
    """{'train': 3600.0} from ['train=3600'], each naming a stage of dvc.yaml and a positive time."""
    from pipelines.dvcrepo import stage_names

    stages = stage_names(repo) if pairs else []
    timeouts = {}
    for pair in pairs:
        stage, _, seconds = (part.strip() for part in pair.partition("="))
        try:
            timeouts[stage] = float(seconds)
        except ValueError:
            raise ConfigError(f"--stage-timeout expects stage=seconds (e.g. train=3600), got '{pair}'") from None
        if stage not in stages:
            hint = difflib.get_close_matches(stage, stages, n=1)
            raise ConfigError(f"--stage-timeout {pair}: no stage '{stage}' in dvc.yaml; "
                              + (f"did you mean '{hint[0]}'?" if hint else f"stages: {', '.join(stages)}"))
        if not 0 < timeouts[stage] < float("inf"):
            raise ConfigError(f"--stage-timeout {pair}: the seconds must be a positive number")
    return timeouts


SetOption = Annotated[list[str] | None, typer.Option("--set", "-S", help="Override a param: key=value (repeatable).")]
PoolOption = Annotated[str | None, typer.Option(
    "--pool", help="Run on this Prefect work pool's workers (they clone origin and share the DVC remote).")]
GpuPoolOption = Annotated[str | None, typer.Option(
    "--gpu-pool", help="Send the GPU stages (train, evaluate) to this work pool's workers; the rest run "
                       "where the run does.")]


@app.command()
def run(
    repo: RepoOption = Path("."),
    set_: SetOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print which stages would run and why; change nothing.")] = False,
    push: Annotated[bool, typer.Option(help="dvc push the outputs afterwards.")] = False,
    lock_timeout: Annotated[float, typer.Option(min=0, help="Seconds to wait for another run of this repo.")] = 0.0,
    stage_timeout: TimeoutOption = None,
    fallback: Annotated[bool, typer.Option(help="If the Prefect API is unreachable, run plain `dvc repro`.")] = False,
    gate: Annotated[bool, typer.Option("--gate", help="End with the quality gate against main; fail on regression.")] = False,
    champion: ChampionOption = None,
    pool: PoolOption = None,
    gpu_pool: GpuPoolOption = None,
) -> None:
    """Run the pipeline as a Prefect flow (no server needed: without PREFECT_API_URL a temporary one runs)."""
    from pipelines import launch
    from pipelines.compare import offline_plots_template
    from stages.common.run_params import check_overrides

    repo = require_repo(repo)
    if pool and (gate or champion):
        raise ConfigError("--gate and --champion judge a run in this workspace; a --pool run comes back as an "
                          "experiment: gate it with `cifar10-pipeline gate --candidate NAME`")
    overrides = parse_assignments(set_ or [])
    check_overrides(repo / "params.yaml", overrides)  # before Prefect starts: a typo costs nothing
    request = launch.RunRequest(repo, overrides, parse_timeouts(stage_timeout or [], repo), dry_run, push,
                                lock_timeout, fallback, gate, pool, gpu_pool, champion)
    offline_plots_template(repo)  # plain `dvc plots show` then draws offline too (.dvc/config names it)
    raise typer.Exit(launch.run(request, os.environ.get("PREFECT_API_URL"), typer.echo,
                                lambda line: typer.echo(line, err=True)))


@app.command()
def serve(
    cron: Annotated[str, typer.Option(help="Cron schedule, e.g. '0 2 * * *' for nightly at 02:00.")] = "0 2 * * *",
    name: Annotated[str, typer.Option(help="Deployment name.")] = "scheduled",
    repo: RepoOption = Path("."),
    set_: SetOption = None,
    push: Annotated[bool, typer.Option(help="dvc push the outputs after each run.")] = False,
    stage_timeout: TimeoutOption = None,
    gate: Annotated[bool, typer.Option("--gate", help="End each run with the quality gate against main.")] = False,
    champion: ChampionOption = None,
) -> None:
    """Serve a scheduled deployment of the flow (needs a Prefect server: see `server`)."""
    from prefect.settings import PREFECT_API_URL

    from pipelines.flow import pipeline
    from stages.common.run_params import check_overrides

    repo = require_repo(repo)
    overrides = parse_assignments(set_ or [])
    check_overrides(repo / "params.yaml", overrides)
    if not PREFECT_API_URL.value():
        raise ConfigError("serve needs a Prefect server: start one with `cifar10-pipeline server`, then "
                          f"export PREFECT_API_URL=http://127.0.0.1:{DEFAULT_PORT}/api")
    typer.echo(f"serving deployment 'cifar10-pipeline/{name}' on cron '{cron}' for {repo} (Ctrl-C stops)")
    # limit=1: a scheduled run that overlaps a running one waits instead of stacking up.
    pipeline.serve(
        name=name, cron=cron, limit=1,
        parameters={"repo_dir": str(repo), "overrides": overrides or None, "push": push,
                    "stage_timeouts": parse_timeouts(stage_timeout or [], repo), "gate": gate, "champion": champion},
    )


@app.command()
def deploy(
    pool: Annotated[str, typer.Option("--pool", help="The Prefect work pool whose workers run it.")],
    concurrency_limit: Annotated[int | None, typer.Option(help="Flow runs of it at a time, across workers.")] = None,
    repo: RepoOption = Path("."),
) -> None:
    """Create the deployments cifar10-experiment/POOL (whole runs) and cifar10-stages/POOL (another
    run's GPU stages): workers clone origin and push experiments back."""
    from pipelines import pool as work_pool
    from pipelines.prefect_server import require_server

    repo = require_repo(repo)
    require_server(os.environ.get("PREFECT_API_URL"))
    git_url, rev, deployment = work_pool.deploy_head(repo, pool, concurrency_limit)
    typer.echo(f"deployments {deployment} and {work_pool.STAGES_FLOW_NAME}/{pool}: code from {git_url}, HEAD {rev[:7]}")
    typer.echo(f"start a worker per machine (or GPU): prefect worker start --pool {pool} --type process --limit 1")


@app.command()
def retrain(
    cron: Annotated[str, typer.Option(help="Cron schedule, e.g. '0 2 * * *' for nightly at 02:00.")] = "0 2 * * *",
    name: Annotated[str, typer.Option(help="Deployment name (cifar10-retrain/NAME).")] = "nightly",
    pool: Annotated[str | None, typer.Option(
        "--pool", help="Deploy to this work pool (its workers clone origin for each run) instead of serving the "
                       "schedule from this process.")] = None,
    branch: Annotated[str, typer.Option(help="The branch of origin to retrain on and to commit each run to.")] = "main",
    champion: Annotated[str, typer.Option(
        help="GTO stage whose version each run is gated against; a pass is assigned it.")] = "prod",
    workdir: Annotated[Path | None, typer.Option(
        help="The clone of origin kept between runs (default: one per remote and branch under ~/.cache).")] = None,
    stage_timeout: TimeoutOption = None,
    repo: RepoOption = Path("."),
) -> None:
    """Schedule retraining on origin's newest commit: each run commits its run to the branch, gates it
    against the champion stage's version and promotes a pass (needs a Prefect server)."""
    from pipelines import retrain as continuous
    from pipelines.pool import deploy_from_origin, shared_remotes
    from pipelines.prefect_server import require_server

    repo = require_repo(repo)
    git_url = shared_remotes(repo)
    require_server(os.environ.get("PREFECT_API_URL"), "scheduled retraining needs a Prefect server")
    parameters = {"git_url": git_url, "branch": branch, "champion": champion,
                  "workdir": str(workdir.resolve()) if workdir else None,
                  "stage_timeouts": parse_timeouts(stage_timeout or [], repo)}
    deployment = f"{continuous.RETRAIN_FLOW}/{name}"
    if pool:
        deploy_from_origin(continuous.RETRAIN_ENTRYPOINT, name, pool, git_url, branch, parameters,
                           concurrency_limit=1, cron=cron)
        typer.echo(f"deployment {deployment} on work pool '{pool}', cron '{cron}': retrains origin's {branch} "
                   f"({git_url}) and promotes to '{champion}'")
        typer.echo(f"start a worker: prefect worker start --pool {pool} --type process; "
                   f"run it now: prefect deployment run {deployment}")
        return
    typer.echo(f"serving deployment {deployment} on cron '{cron}': retrains origin's {branch} ({git_url}) and "
               f"promotes to '{champion}' (Ctrl-C stops; run it now: prefect deployment run {deployment})")
    # limit=1: a scheduled run that overlaps a running one waits instead of stacking up.
    continuous.retrain.serve(name=name, cron=cron, limit=1, parameters=parameters, print_starting_message=False)


@app.command()
def alerts(
    webhook: Annotated[str, typer.Option(help="Where to POST the alert: a Slack, Teams or any other webhook URL.")],
) -> None:
    """Send a failed, crashed or late run of the pipeline to a webhook (Prefect automation; rerun to change it)."""
    from pipelines.alerts import set_up_alerts
    from pipelines.prefect_server import require_server

    if not webhook.startswith(("http://", "https://")):
        raise ConfigError(f"--webhook {webhook!r} is not an http(s) URL; pass the URL your chat tool gave")
    require_server(os.environ.get("PREFECT_API_URL"), "alerts need the Prefect server your scheduled runs report to")
    typer.echo(set_up_alerts(webhook).describe(webhook))


@app.command()
def server(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port on 127.0.0.1.")] = DEFAULT_PORT,
    home: Annotated[Path | None, typer.Option(
        help="PREFECT_HOME (SQLite database and settings); default: $PREFECT_HOME, else .prefect")] = None,
) -> None:
    """Start a local Prefect server (SQLite under a project-local PREFECT_HOME)."""
    from pipelines.prefect_server import PREFECT_HOME
    from pipelines.prefect_server import serve as serve_api

    home = (home or Path(os.environ.get("PREFECT_HOME") or PREFECT_HOME)).resolve()
    home.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}/api"
    typer.echo(f"starting a Prefect server on {url} with PREFECT_HOME={home}")
    typer.echo(f"in another shell: export PREFECT_API_URL={url}")
    raise typer.Exit(serve_api(port, home))


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
StageOption = Annotated[str | None, typer.Option("--stage", help="Also assign the version to this GTO stage (e.g. prod).")]


@app.command()
def status(repo: RepoOption = Path("."), as_json: JsonOption = False) -> None:
    """DVC's view of what is stale, stage by stage, and why; with PREFECT_API_URL, also the server's
    deployments, their schedules and the last flow runs."""
    from pipelines.dvcrepo import inspect_repo, plan
    from pipelines.prefect_server import orchestration_status
    from stages.common.run_params import check_overrides

    repo = require_repo(repo)
    check_overrides(repo / "params.yaml", {})  # DVC itself would hang on some broken files
    graph, reasons = inspect_repo(repo)
    fates = plan(graph, reasons)
    server = orchestration_status(os.environ.get("PREFECT_API_URL"), lambda line: typer.echo(line, err=True))
    if as_json:
        typer.echo(json.dumps({"stages": [{"stage": stage, "status": fate} for stage, fate in fates.items()],
                               **server}, indent=2))
        return
    for stage, fate in fates.items():
        typer.echo(f"{stage}: {fate}")
    for title, rows in server.items():
        typer.echo(f"\n{title.replace('_', ' ')} on {os.environ['PREFECT_API_URL']}:")
        typer.echo("\n".join("  " + "; ".join(f"{k}: {v}" for k, v in row.items()) for row in rows) or "  none")


@app.command()
def compare(
    a: Annotated[str | None, typer.Argument(help="Git revision, branch, tag or experiment name.")] = None,
    b: Annotated[str | None, typer.Argument(help="Another one (default: the workspace).")] = None,
    all_runs: Annotated[bool, typer.Option(
        "--all", help="Every commit and experiment with metrics: a table, and the history page history.html.")] = False,
    sort_by: Annotated[str, typer.Option(help="Metric to sort --all's table by, and to pick its --pages by.")] = "accuracy",
    pages: Annotated[int, typer.Option(
        min=0, help="With --all: write the compare page against main of this many best runs (each row of "
                    "the others shows the command that writes its page).")] = 3,
    csv: Annotated[Path | None, typer.Option(help="Also write the --all table as CSV here.")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Folder for compare.md/.html and figures (with --all: for history.html; default comparisons/).")] = None,
    repo: RepoOption = Path("."),
    as_json: JsonOption = False,
) -> None:
    """Two runs side by side with bootstrap intervals and McNemar's test, or --all runs as a table and a page."""
    from pipelines.compare import compare as compare_runs
    from pipelines.compare import safe_name
    from pipelines.history import history_json, markdown, write_history

    repo = require_repo(repo)
    if all_runs:
        history, page = write_history(repo, out or repo / COMPARISONS_DIR, pages, sort_by)
        table = history.table(sort_by)
        if csv:
            table.to_csv(csv, index=False)
        if as_json:
            typer.echo(history_json(history, sort_by, page))
            return
        typer.echo(markdown(table) if not table.empty else "no runs with metrics yet")
        typer.echo(f"written: {page}" + (f" and {csv}" if csv else ""))
        return
    if a is None:
        raise ConfigError("compare needs a revision or experiment (or --all)")
    folder = out or repo / COMPARISONS_DIR / safe_name(f"{a}_vs_{b or 'workspace'}")
    text, findings = compare_runs(repo, a, b, folder)
    if as_json:
        typer.echo(json.dumps(findings, indent=2, default=str))
        return
    typer.echo(text)
    typer.echo(f"written: {folder / 'compare.md'} and compare.html")


@app.command()
def gate(
    baseline: Annotated[str | None, typer.Option(
        help="Default: the newest commit with metrics on origin/main (else local main) before the candidate.")] = None,
    champion: Annotated[str | None, typer.Option(
        help="Gate against the version GTO assigns to this stage (e.g. prod) instead; with --register a pass "
             "assigns the candidate this stage and pushes its tags to origin. Nothing there yet: it passes.")] = None,
    candidate: Annotated[str | None, typer.Option(help="Default: the workspace.")] = None,
    register: Annotated[bool, typer.Option("--register", help="On a pass, register the candidate's model with GTO (a commit: default HEAD).")] = False,
    stage: StageOption = None,
    repo: RepoOption = Path("."),
) -> None:
    """Exit 1 when the candidate's accuracy or a class's recall dropped beyond params.yaml's gate."""
    from pipelines.gate import champion_verdict, gate_verdict, promote_champion, register_passed_candidate

    repo = require_repo(repo)
    if champion and (baseline or (stage and stage != champion)):
        raise ConfigError("--champion STAGE is the baseline and the stage a pass is assigned; "
                          "drop --baseline and --stage, or drop --champion")
    verdict = champion_verdict(repo, champion, candidate) if champion else gate_verdict(repo, baseline, candidate)
    typer.echo(verdict.markdown())
    verdict.raise_if_failed()
    if champion and register:
        typer.echo(promote_champion(repo, verdict, champion, candidate))
    elif register or stage:
        typer.echo(register_passed_candidate(repo, candidate, stage).describe())


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="Search space YAML (see sweeps/seed002.yaml).")],
    n: Annotated[int | None, typer.Option("-n", help="Random points (overrides the file).")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Points in flight, each in its own temp workspace (on a pool: TPE's; grid and random send all).")] = 1,
    name: Annotated[str | None, typer.Option(help="Sweep name; points are NAME-1, NAME-2, ... Rerun a name to resume it.")] = None,
    repo: RepoOption = Path("."),
    pool: PoolOption = None,
    gpu_pool: GpuPoolOption = None,
    storage: Annotated[str | None, typer.Option(
        help="Optuna storage URL for the sweep's study (e.g. postgresql://...); default: comparisons/NAME.journal.")] = None,
) -> None:
    """Run a grid, random or TPE (Optuna) search as DVC experiments; end with the ranked table and the best point.
    Rerun with the same --name to resume it."""
    from pipelines.prefect_server import flow_api, require_server
    from stages.common.params import read_params, read_sweep_file, whole_lists
    from stages.common.run_params import check_overrides

    repo = require_repo(repo)
    cfg = read_sweep_file(config)
    if gpu_pool and not pool:
        raise ConfigError("--gpu-pool needs --pool: the local queue's points run in DVC's temporary workspaces")
    if pool:
        require_server(os.environ.get("PREFECT_API_URL"))
    keys = whole_lists(dict.fromkeys(cfg["space"]), read_params(repo / "params.yaml"))
    check_overrides(repo / "params.yaml", keys, values=False)  # each point's values, in the flow
    kind, seed, n = cfg.get("kind", "random"), cfg.get("seed", 0), n or cfg.get("n", 4)
    pruner = cfg.get("pruner")
    if pruner is not None:
        from stages.common.trial import pruner_of

        pruner_of(pruner)
    if name:  # a sweep run before under this name: its study must hold this search
        from pipelines.compare import safe_name
        from pipelines.study import check_search, sample_points, search_of, study_storage

        name = safe_name(name)
        total = n if kind == "tpe" else len(sample_points(cfg["space"], kind, n, seed))
        search = search_of(kind, cfg["space"], seed, total, pruner)
        check_search(study_storage(repo, name, storage), name, search)
    with flow_api(repo):
        from pydantic import SecretStr

        from pipelines.sweep import sweep as sweep_flow  # Prefect loads its settings now, the API's among them

        result = sweep_flow(repo_dir=str(repo), space=cfg["space"], kind=kind, n=n, seed=seed, jobs=jobs, name=name,
                            pool=pool, gpu_pool=gpu_pool, storage=SecretStr(storage) if storage else None,
                            pruner=pruner)
    typer.echo((repo / COMPARISONS_DIR / f"{result['name']}.md").read_text())
    if result["failed"]:
        raise PipelineError(f"{len(result['failed'])} of {result['points']} points failed: {', '.join(result['failed'])}")


@app.command()
def promote(
    experiment: Annotated[str, typer.Argument(help="Experiment name (dvc exp show).")],
    branch: Annotated[str | None, typer.Option(help="Make a git branch of it (and register its model) instead of applying it here.")] = None,
    stage: StageOption = None,
    repo: RepoOption = Path("."),
) -> None:
    """Keep an experiment: as a new branch whose model is registered with GTO, or applied to the
    workspace (then git commit it and `register`)."""
    from pipelines.registry import promote as promote_experiment

    typer.echo(promote_experiment(require_repo(repo), experiment, branch, stage))


@app.command()
def register(
    rev: Annotated[str, typer.Argument(help="Commit, branch or tag whose exported model to register.")] = "HEAD",
    stage: StageOption = None,
    repo: RepoOption = Path("."),
) -> None:
    """Register the model at a commit as the next version in GTO (git tags: `gto show` lists them)."""
    from pipelines.registry import register as register_model

    typer.echo(register_model(require_repo(repo), rev, stage).describe())


@app.command()
def preset(
    name: Annotated[str | None, typer.Argument(help="Preset name; omit to list them.")] = None,
    repo: RepoOption = Path("."),
) -> None:
    """Write a named recipe (presets/NAME.yaml: the seeds' notebooks, the fast default) into params.yaml."""
    from stages.common import run_params as presets

    folder = presets.presets_dir(repo.resolve())
    if name is None:
        names = presets.available(folder)
        width = max(map(len, names), default=0)
        typer.echo("\n".join(f"{name:<{width}}  {presets.summary(name, folder)}" for name in names))
        return
    repo = require_repo(repo)
    values = presets.apply(repo / "params.yaml", name, folder)
    typer.echo(f"params.yaml now holds preset '{name}' ({values['train']['model']}, "
               f"{values['train']['epochs']} epochs); `dvc repro` or `cifar10-pipeline run` to train it")


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files of any size or mode, folders of them, or archives "
                                                     "(tar, tar.gz, zip) of them.")],
    model: Annotated[Path | None, typer.Option(help="Export folder (default: the pipeline's, dvc.yaml's paths.exports).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes shown per image, likeliest first.")] = DEFAULT_TOP_K,
    out: Annotated[Path | None, typer.Option(help="Write the predictions to this CSV file (written whole at the "
                                                  "end) instead of printing them.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images decoded and predicted at a time.")] = 256,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", show_default="when stderr is a "
                                                  "terminal", help="Show a progress bar on stderr.")] = None,
    repo: RepoOption = Path("."),
) -> None:
    """Class and probability for each image, from the exported ONNX model (no TensorFlow). An image
    that cannot be read is named and skipped; the exit code is then 2."""
    from tqdm import tqdm

    from pipelines.predict import PredictError, image_sources, predict_sources, write_predictions
    from stages.common.paths import artifact_paths
    from stages.common.serving import load_exported

    if model is not None and not model.is_dir():
        raise ConfigError(f"--model {model} is not a folder; pass an export folder (dvc.yaml's paths.exports)")
    if out is not None and out.is_dir():
        raise ConfigError(f"--out {out} is a folder; pass a CSV file name")
    classifier, _ = load_exported(model or repo / artifact_paths(require_repo(repo))["exports"])
    top_k = min(top_k, len(classifier.classes))
    sources, total = image_sources(paths)
    shown = tqdm(total=total, unit=" images", file=sys.stderr, disable=None if progress is None else not progress,
                 dynamic_ncols=True)
    unreadable: list[PredictError] = []
    for name, ranked in write_predictions(predict_sources(sources, classifier, top_k, batch_size), out, top_k):
        shown.update()
        if isinstance(ranked, PredictError):
            unreadable.append(ranked)
            shown.write(f"warning: skipped {ranked}", file=sys.stderr)
        elif out is None:
            shown.write(f"{name}: " + ", ".join(f"{label} ({p:.4f})" for label, p in ranked), file=sys.stdout)
    shown.close()
    if unreadable:
        raise PredictError(f"{len(unreadable)} image(s) could not be read and were skipped, the first: {unreadable[0]}")


@app.command()
def api(
    model: Annotated[Path | None, typer.Option(help="Export folder (default: the pipeline's, dvc.yaml's paths.exports).")] = None,
    rev: Annotated[str | None, typer.Option(help="Serve the export of this git revision or GTO tag instead.")] = None,
    stage: Annotated[str | None, typer.Option(help="Serve the version GTO assigns to this stage (e.g. prod), and "
                                                   "switch when the stage moves.")] = None,
    poll: Annotated[float, typer.Option(min=0.1, help="With --stage: seconds between looks at origin's tags.")] = 30.0,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Server processes on the port, each with its own model.")] = 1,
    threads: Annotated[int, typer.Option(min=0, help="ONNX Runtime threads per model call (0: the cores, "
                                                     "shared out between the workers).")] = 0,
    max_batch: Annotated[int, typer.Option(min=1, help="Most images in one model call, gathered from concurrent "
                                                       "requests (1: no batching).")] = Batching.max_batch,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="How long a batch waits for requests being decoded "
                                                           "(a lone request never waits).")] = Batching.max_wait_ms,
    drift_window: Annotated[int, typer.Option(min=2, help="Images over which input drift is judged.")] = Drift.window,
    drift_threshold: Annotated[float, typer.Option(min=0, max=1, help="Drift score (Hellinger distance, 0..1) "
                                                                      "past which /health says degraded.")]
    = Drift.threshold,
    max_body_mib: Annotated[float, typer.Option(min=0.001, help="Largest request body, refused (413) as it arrives.")]
    = Limits.max_body_bytes / MIB,
    max_pixels: Annotated[int, typer.Option(min=1024, help="Pixels (width x height, summed) one request's images "
                                                           "may hold; more is refused (413) before decoding.")]
    = Limits.max_pixels,
    head_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds a connection has to send a request's "
                                                              "headers before it is closed.")] = Limits.head_timeout_s,
    body_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds a request's body may take to arrive "
                                                              "(then 408).")] = Limits.body_timeout_s,
    repo: RepoOption = Path("."),
) -> None:
    """Serve the exported model over HTTP: a demo page at /, POST /predict, GET /health, /metadata,
    /metrics, docs at /docs."""
    from pipelines.api import server
    from stages.common.paths import artifact_paths

    if sum(option is not None for option in (model, rev, stage)) > 1:
        raise ConfigError("api takes one of --model, --rev and --stage")
    settings = Settings(
        exports=str(model), threads=threads, batching=Batching(max_batch, max_wait_ms),
        drift=Drift(window=drift_window, min_images=min(Drift.min_images, drift_window), threshold=drift_threshold),
        limits=Limits(max_body_bytes=int(max_body_mib * MIB), max_pixels=max_pixels, head_timeout_s=head_timeout,
                      body_timeout_s=body_timeout))
    if model is not None:
        server.serve(settings, host, port, workers)
        return
    repo = require_repo(repo)
    exports = artifact_paths(repo)["exports"]
    if stage is not None:
        server.serve_stage(repo, stage, exports, settings, host, port, workers, poll)
    elif rev is not None:
        server.serve_revision(repo, rev, exports, settings, host, port, workers)
    else:
        server.serve_workspace(repo, exports, settings, host, port, workers)


def version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"cifar10-pipeline {version('cifar10-pipeline')}")
        raise typer.Exit()


@app.callback()
def common(
    _version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                           help="Print the version and exit.")] = False,
) -> None:
    """Run, schedule and inspect the CIFAR-10 DVC pipeline through Prefect."""


# Typer's own copy of Click's exception for a command line it cannot parse (typer 0.26 and later
# bundle Click; earlier ones re-export Click's): taken from typer, so it is the class it raises.
UsageError = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "UsageError")


def usage_error_line(err: Exception) -> str:
    """Click's message, and where the command's help is, on one line."""
    ctx = getattr(err, "ctx", None)
    command = ctx.command_path if ctx is not None else "cifar10-pipeline"
    return f"error: {err.format_message().rstrip('.')}; see '{command} --help'"  # type: ignore[attr-defined]


def main() -> None:
    """Every command's errors end here: one line on stderr and the exit code of their cause."""
    # Prefect waits 20 s for its temporary API; a loaded 2-core machine can take longer
    # (seen in this project's tests). Set before Prefect is imported, which reads it then; a
    # user's own setting wins.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    interrupt_on_sigterm()
    try:
        code = app(standalone_mode=False, prog_name="cifar10-pipeline")
    except UsageError as err:
        typer.echo(usage_error_line(err), err=True)
        code = USAGE
    except typer.Abort:  # Ctrl-C while Click prompted or parsed
        code = error_exit(KeyboardInterrupt())
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - the one boundary: one line, never a traceback
        code = error_exit(err)
    else:
        if code == INTERRUPTED:  # Typer turns Ctrl-C inside a command into a silent exit 130
            error_exit(KeyboardInterrupt())
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
