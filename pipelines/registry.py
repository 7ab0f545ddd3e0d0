"""Model versions in the GTO registry: git tags on the commits whose exported model is kept.

The artifact is declared once, in dvc.yaml's `artifacts:` (DVC Studio's convention), so `gto show`,
`dvc artifacts get . NAME --stage prod` and DVC Studio all see the same model.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from stages.common.errors import CommandFailed, ConfigError, TransientError
from stages.common.paths import DVC_YAML


@dataclass(frozen=True)
class Registered:
    artifact: str
    version: str
    commit: str
    stage: str | None

    def describe(self) -> str:
        staged = f", assigned to stage '{self.stage}'" if self.stage else ""
        return (f"registered {self.artifact} {self.version} at {self.commit[:7]}{staged} (`gto show`; "
                f"push the tags with `git push origin --tags`)")


@dataclass(frozen=True)
class StageVersion:
    version: str
    commit: str


def model_artifact(repo: Path) -> str:
    """The name of the model artifact dvc.yaml declares."""
    import yaml

    declared = yaml.safe_load((repo / DVC_YAML).read_text()) or {}
    models = [name for name, spec in (declared.get("artifacts") or {}).items() if (spec or {}).get("type") == "model"]
    if len(models) != 1:
        raise ConfigError(f"{repo / DVC_YAML} declares {len(models)} artifacts of type model; it needs exactly "
                          "one under `artifacts:` (restore it from the project's dvc.yaml)")
    return models[0]


def register(repo: Path, ref: str = "HEAD", stage: str | None = None) -> Registered:
    """Register the next version of the model at `ref` (and assign it to `stage`), as `gto register`
    and `gto assign` do; a commit already registered keeps its version."""
    from gto import api as gto
    from gto.exceptions import GTOException, VersionExistsForCommit

    from pipelines.dvcrepo import git

    name = model_artifact(repo)
    commit = git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if not commit:
        raise ConfigError(f"'{ref}' is no commit of {repo}; register a commit, branch or tag (commit the run first)")
    try:
        try:
            version = gto.register(str(repo), name, commit).version
        except VersionExistsForCommit:
            version = next(v["version"] for v in gto.show(str(repo), name)
                           if v["commit_hexsha"] == commit and v["registrations"])
        if stage:
            gto.assign(str(repo), name, stage, version=version)
    except GTOException as err:
        raise ConfigError(f"GTO refused to register {name} at {ref} ({err}); check `gto show {name}`") from None
    return Registered(name, version, commit, stage)


def promote(repo: Path, experiment: str, branch: str | None, stage: str | None) -> str:
    """Keep an experiment: applied to the workspace (then commit and `register` it), or as a new
    branch whose model is registered (and assigned to `stage`). What happened, for the user."""
    import difflib

    from pipelines.dvcrepo import dvc

    experiments = dvc(repo, "exp", "list", "--all-commits", "--name-only").split()
    if experiment not in experiments:
        hint = difflib.get_close_matches(experiment, experiments, n=1)
        raise ConfigError(f"no experiment named '{experiment}' in {repo}; "
                          + (f"did you mean '{hint[0]}'?" if hint else "`dvc exp list --all-commits` lists them"))
    from pipelines.pool import pull_outputs_if_pushed

    refuse_pruned(repo, experiment)
    pull_outputs_if_pushed(repo, experiment)
    if not branch:
        if stage:
            raise ConfigError("--stage registers a commit: pass --branch too, or apply, commit and `register --stage`")
        output = apply_experiment(repo, experiment)
        forget_trial(repo)
        skipped = stale_stages((repo / DVC_YAML).read_text(), (repo / "dvc.lock").read_text())
        if skipped:
            dvc(repo, "repro", *skipped)
        ran = f"; ran {', '.join(skipped)} for it" if skipped else ""
        return f"{output}{ran}; `git commit` it, then `cifar10-pipeline register` to version its model"
    branched = dvc(repo, "exp", "branch", experiment, branch).strip()
    skipped = run_skipped_stages(repo, branch, experiment)
    ran = f"\nran {', '.join(skipped)} for it on {branch}" if skipped else ""
    return f"{branched}{ran}\n{register(repo, branch, stage).describe()}"


def apply_experiment(repo: Path, experiment: str) -> str:
    """`dvc exp apply`. A point of a baseline that never ran export and report has no outputs for
    them: DVC applies the rest and fails checking those out, so the rest is checked out alone
    (promote then runs them)."""
    from pipelines.dvcrepo import dvc

    try:
        return dvc(repo, "exp", "apply", experiment).strip() or f"{experiment} applied to the workspace"
    except CommandFailed as err:
        if "Checkout failed" not in str(err):
            raise
        dvc(repo, "checkout", "--allow-missing")
        return f"{experiment} applied to the workspace"


def refuse_pruned(repo: Path, experiment: str) -> None:
    """A point its sweep's pruner stopped holds a model trained part of the way: never promoted."""
    import json

    from pipelines.dvcrepo import git
    from pipelines.runs import experiment_commit
    from stages.common.paths import RUN_INFO, artifact_paths
    from stages.common.trial import PRUNED_AT

    rev = experiment_commit(repo, experiment)
    info = git(repo, "show", f"{rev}:{(artifact_paths(repo)['train'] / RUN_INFO).as_posix()}") if rev else None
    pruned_after = json.loads(info).get(PRUNED_AT) if info else None
    if pruned_after:
        raise ConfigError(f"{experiment} was pruned after epoch {pruned_after}: its model is a partial run; promote a "
                          "finished point (the sweep's table ranks them first)")


def forget_trial(tree: Path) -> bool:
    """Clear train.trial, the sweep's trial a promoted point's params still name: its study is the
    sweep's (not committed), so training after a later change would look for it and fail. The
    trial only listened to a point that trained to the end, so the train stage's record is
    committed as is (`dvc commit`), not run again. Whether anything changed."""
    from pipelines.dvcrepo import dvc
    from stages.common.params import PARAMS_FILE, read_params, update_params_file
    from stages.common.trial import TRIAL_KEY

    params_file = tree / PARAMS_FILE
    section, key = TRIAL_KEY.split(".")
    if (read_params(params_file).get(section) or {}).get(key) is None:
        return False
    update_params_file(params_file, {TRIAL_KEY: None})
    dvc(tree, "commit", "--force", section)
    return True


def stale_stages(dvc_yaml: str, lock_text: str) -> list[str]:
    """The stages dvc.yaml declares that dvc.lock has no record of, or whose record names an input
    another stage's record has since changed: a sweep's point runs up to evaluate, so its export
    and report never ran or still hold the baseline's run."""
    import yaml

    declared = list((yaml.safe_load(dvc_yaml) or {}).get("stages") or {})
    lock = (yaml.safe_load(lock_text) or {}).get("stages") or {}
    outs = {out["path"]: out.get("md5") for entry in lock.values() for out in entry.get("outs") or []}
    return [stage for stage in declared if stage not in lock or any(
        dep["path"] in outs and dep.get("md5") != outs[dep["path"]] for dep in lock[stage].get("deps") or [])]


def run_skipped_stages(repo: Path, branch: str, experiment: str) -> list[str]:
    """Run on `branch` the stages its commit left stale, in a git worktree sharing this repo's
    DVC cache (the rest is checked out from it), and commit them there; the workspace here is
    not touched. Returns the stages run."""
    import shutil
    import tempfile

    from pipelines.dvcrepo import dvc, git

    skipped = stale_stages(git(repo, "show", f"{branch}:{DVC_YAML}") or "", git(repo, "show", f"{branch}:dvc.lock") or "")
    tree = Path(tempfile.mkdtemp(prefix="cifar10-promote-")) / "tree"
    if git(repo, "worktree", "add", "--quiet", str(tree), branch) is None:
        raise ConfigError(f"could not check out {branch} in a worktree to run {', '.join(skipped)}; "
                          f"`git worktree list`, then `dvc repro` on {branch} yourself")
    try:
        dvc(tree, "cache", "dir", "--local", dvc(repo, "cache", "dir").strip())
        dvc(tree, "checkout", "--allow-missing")  # the stages never run have nothing to check out
        forgot = forget_trial(tree)
        if skipped:
            dvc(tree, "repro", *skipped)
        if not (skipped or forgot):
            return []
        done = [*([f"{', '.join(skipped)} run for it"] if skipped else []), *(["train.trial cleared"] if forgot else [])]
        committed = subprocess.run(["git", "commit", "-qam", f"promote {experiment}: {'; '.join(done)}"],
                                   cwd=tree, capture_output=True, text=True)
        if committed.returncode != 0:
            raise ConfigError(f"git commit on {branch} failed ({committed.stderr.strip() or committed.stdout.strip()}); "
                              "set user.name and user.email (git config) and rerun")
        return skipped
    finally:
        git(repo, "worktree", "remove", "--force", str(tree))
        shutil.rmtree(tree.parent, ignore_errors=True)


def fetch_origin_tags(repo: Path) -> None:
    """Origin's tags, when the repo has an origin: a stage may have moved there. An origin that
    cannot be reached is an error: the local tags may name a version origin has moved past."""
    from pipelines.dvcrepo import git

    if "origin" not in (git(repo, "remote") or "").split():
        return
    fetched = subprocess.run(["git", "fetch", "--quiet", "--tags", "--force", "origin"], cwd=repo,
                             capture_output=True, text=True)
    if fetched.returncode != 0:
        reason = (fetched.stderr.strip().splitlines() or ["no reason given"])[-1]
        raise TransientError(f"origin's tags cannot be fetched ({reason}), so which version holds a stage there "
                             "is unknown; rerun when origin is reachable")


def stage_version(repo: Path, stage: str) -> StageVersion | None:
    """The version of the model artifact GTO assigns to `stage` now, None when none is."""
    from gto import api as gto
    from gto.exceptions import ArtifactNotFound

    try:
        found = gto.find_versions_in_stage(str(repo), model_artifact(repo), stage)
    except ArtifactNotFound:  # nothing registered yet: no version holds any stage
        return None
    if not found:
        return None
    version = found[0] if isinstance(found, list) else found
    return StageVersion(version.version, version.commit_hexsha)


def push_version_tags(repo: Path, registered: Registered) -> bool:
    """Push the GTO tags at the registered commit (its version, its stage assignment) to origin, so
    every clone, and an API following the stage, sees them; False when there is no origin."""
    from pipelines.dvcrepo import git

    if "origin" not in (git(repo, "remote") or "").split():
        return False
    tags = [t for t in (git(repo, "tag", "--points-at", registered.commit) or "").split()
            if t.startswith((f"{registered.artifact}@", f"{registered.artifact}#"))]
    pushed = subprocess.run(["git", "push", "--quiet", "origin", *[f"refs/tags/{t}" for t in tags]], cwd=repo,
                            capture_output=True, text=True) if tags else None
    if pushed and pushed.returncode != 0:
        reason = (pushed.stderr.strip().splitlines() or ["no reason given"])[-1]
        raise TransientError(f"{registered.version} is registered here, but pushing its tags to origin failed "
                             f"({reason}); push them with `git push origin --tags`")
    return True
