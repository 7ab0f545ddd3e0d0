"""The quality gate: refuse a candidate whose accuracy or any class's recall dropped too far.

Thresholds live in params.yaml (`gate:`). The baseline defaults to the newest commit with
evaluation metrics at or before where the candidate left the upstream main branch (never the
candidate's own commit); the candidate defaults to the workspace.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pipelines.dvcrepo import git
from pipelines.registry import Registered, StageVersion, fetch_origin_tags, push_version_tags, register, stage_version
from pipelines.runs import UPSTREAM_MAIN, WORKSPACE, Run, check_comparable, load_run, resolve, run_record
from pipelines.statistics import ALPHA, mcnemar, paired, uncertainty
from stages.common.errors import ConfigError, PipelineError
from stages.common.render import report_classes
from stages.common.schemas import GateParams


class GateFailed(PipelineError):
    """The candidate regressed beyond params.yaml's gate (`cifar10-pipeline gate`, `run --gate`)."""

    exit_code = 1


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    baseline: str
    candidate: str
    reasons: list[str]
    lines: list[str]
    champion: StageVersion | None = None  # gated against a registry stage: the version holding it

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise GateFailed("quality gate failed: " + "; ".join(self.reasons))

    def markdown(self) -> str:
        head = f"**Quality gate {'passed' if self.passed else 'FAILED'}**: {self.candidate} against {self.baseline}"
        return "\n".join([head, "", *[f"- {line}" for line in self.lines]]) + "\n"


def load_gate_params(repo: Path) -> GateParams:
    from stages.common.params import load_section

    return load_section("gate", repo / "params.yaml")


def default_baseline(repo: Path, candidate: str | None = None) -> tuple[str, str]:
    """(commit, branch): the newest commit with metrics at or before the merge-base of the
    candidate and the upstream main branch, skipping the candidate's own commit (on main, that is
    the commit before it).

    CI checkouts often have no local `main`, so `origin/main` is tried first; a fresh clone whose
    runs are committed on local main only (none pushed yet) falls back to it.
    """
    metrics, _ = record = run_record(repo)
    upstreams = [ref for ref in UPSTREAM_MAIN if git(repo, "rev-parse", "--verify", "--quiet", ref)]
    if not upstreams:
        raise ConfigError(f"no main branch here ({', '.join(UPSTREAM_MAIN)}); pass --baseline REV")
    tip = resolve(repo, candidate) or "HEAD"
    # A run is a commit that changed dvc.lock or the metrics (two runs can score the same). The
    # candidate's own is the newest at its tip; none when the workspace holds a new, uncommitted run.
    own = git(repo, "log", "-1", "--format=%H", tip, "--", *record)
    if candidate in (None, WORKSPACE) and git(repo, "status", "--porcelain", "--", *record):
        own = None
    for upstream in upstreams:
        start = git(repo, "merge-base", tip, upstream)
        for commit in (git(repo, "log", "--format=%H", start, "--", *record) or "").split() if start else []:
            if commit != own and git(repo, "cat-file", "-e", f"{commit}:{metrics}") is not None:
                return commit, upstream
    raise ConfigError(f"no commit before the candidate on {' or '.join(upstreams)} has {metrics}; commit a run "
                      "first or pass --baseline REV")


def class_drop_p(baseline: Run, candidate: Run, cls: str) -> float:
    """McNemar on the class's own images: did its recall drop beyond chance?"""
    a, b = baseline.predictions, candidate.predictions
    assert a is not None and b is not None
    mine = (a["actual"] == cls).to_numpy()
    right_a, right_b = (a["actual"] == a["predicted"]).to_numpy(), (b["actual"] == b["predicted"]).to_numpy()
    return mcnemar(right_a[mine], right_b[mine])[2]


def judge(baseline: Run, candidate: Run, params: GateParams) -> GateVerdict:
    """Pure decision on two loaded runs. With require_significance, the accuracy drop counts when
    McNemar on all images finds it significant, a class's recall drop when McNemar on that class's
    images does."""
    reasons, lines = [], []
    drop = baseline.metrics["accuracy"] - candidate.metrics["accuracy"]
    is_paired = paired(baseline.predictions, candidate.predictions)
    significant = True
    if is_paired:
        stats = uncertainty(baseline.predictions, candidate.predictions, baseline.name, candidate.name)
        assert stats.p_value is not None
        significant = stats.p_value < ALPHA
        lines.append(f"McNemar p = {stats.p_value:.3g} ({stats.verdict})")
    elif params.require_significance:
        lines.append("no paired predictions: significance cannot be tested, so drops count as real")
    lines.insert(0, f"accuracy {baseline.metrics['accuracy']:.4f} -> {candidate.metrics['accuracy']:.4f} "
                    f"({round(-drop, 4) + 0.0:+.4f}; a drop of more than {params.max_accuracy_drop} fails)")
    if drop > params.max_accuracy_drop and (not params.require_significance or significant):
        reasons.append(f"accuracy dropped by {drop:.4f} > {params.max_accuracy_drop} (gate.max_accuracy_drop)")
    for cls in report_classes(baseline.report):
        if cls not in candidate.report:
            continue
        recall_drop = baseline.report[cls]["recall"] - candidate.report[cls]["recall"]
        if recall_drop <= params.max_recall_drop:
            continue
        why = f"recall of {cls} dropped by {recall_drop:.4f} > {params.max_recall_drop} (gate.max_recall_drop)"
        if params.require_significance and is_paired:
            p = class_drop_p(baseline, candidate, cls)
            if p >= ALPHA:
                lines.append(f"{why}, but McNemar on its images finds it within noise (p = {p:.3g})")
                continue
            why += f", McNemar on its images p = {p:.3g}"
        reasons.append(why)
    lines += reasons
    return GateVerdict(not reasons, baseline.name, candidate.name, reasons, lines)


def gate_verdict(repo: Path, baseline: str | None = None, candidate: str | None = None) -> GateVerdict:
    params = load_gate_params(repo)
    if baseline is None:
        commit, branch = default_baseline(repo, candidate)
        base_run = load_run(repo, commit)
        base_run.name = f"{commit[:7]} (the newest run on {branch} before the candidate)"
    else:
        base_run = load_run(repo, baseline)
    candidate_run = load_run(repo, candidate or WORKSPACE)
    check_comparable(base_run, candidate_run)
    return judge(base_run, candidate_run, params)


def champion_verdict(repo: Path, stage: str, candidate: str | None = None) -> GateVerdict:
    """The candidate against the champion: the version GTO assigns to `stage` (origin's tags fetched
    first). With no version there yet the candidate passes: it becomes the first champion."""
    fetch_origin_tags(repo)
    champion = stage_version(repo, stage)
    candidate_run = load_run(repo, candidate or WORKSPACE)
    if champion is None:
        return GateVerdict(True, f"nothing in '{stage}'", candidate_run.name, [],
                           [f"no version holds '{stage}' yet: the candidate passes, to be its first"])
    base_run = load_run(repo, champion.commit)
    base_run.name = f"{champion.version} ({champion.commit[:7]}, in '{stage}')"
    check_comparable(base_run, candidate_run)
    verdict = judge(base_run, candidate_run, load_gate_params(repo))
    return dataclasses.replace(verdict, champion=champion)


def promote_champion(repo: Path, verdict: GateVerdict, stage: str, candidate: str | None) -> str:
    """A candidate that passed against `stage`'s champion, registered, assigned `stage`, and its
    tags pushed to origin; what happened, for the user and the notification."""
    require_committed(repo, candidate)
    commit = resolve(repo, candidate) or git(repo, "rev-parse", "HEAD")
    if verdict.champion and verdict.champion.commit == commit:
        return f"the candidate is {verdict.champion.version}, already in '{stage}': nothing to promote"
    registered = register_passed_candidate(repo, candidate, stage)
    pushed = push_version_tags(repo, registered)
    return (f"promoted {registered.artifact} {registered.version} ({registered.commit[:7]}) to '{stage}'"
            + ("; tags pushed to origin" if pushed else "; no origin: its tags stay in this clone"))


def require_committed(repo: Path, candidate: str | None) -> None:
    """A version is a commit: the workspace (candidate None) must hold no run that is not committed."""
    if candidate is None and git(repo, "status", "--porcelain", "--", "dvc.lock"):
        raise ConfigError("the gated run (the workspace) is not committed, so there is no version to register; "
                          "commit it, then `cifar10-pipeline register`")


def register_passed_candidate(repo: Path, candidate: str | None, stage: str | None) -> Registered:
    """A candidate that passed the gate, registered with GTO (and assigned to `stage`)."""
    require_committed(repo, candidate)
    return register(repo, candidate or "HEAD", stage)
