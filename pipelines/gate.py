"""The quality gate: refuse a candidate whose accuracy or any class's recall dropped too far.

Thresholds live in params.yaml (`gate:`). The baseline defaults to the newest commit on the main
branch that has evaluation metrics; the candidate defaults to the workspace.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipelines.compare import METRICS, WORKSPACE, Run, load_run, uncertainty


@dataclass(frozen=True)
class GateParams:
    max_accuracy_drop: float
    max_recall_drop: float
    require_significance: bool  # fail only drops McNemar finds significant (p < 0.05)


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    baseline: str
    candidate: str
    reasons: list[str]
    lines: list[str]

    def markdown(self) -> str:
        head = f"**Quality gate {'passed' if self.passed else 'FAILED'}**: {self.candidate} against {self.baseline}"
        return "\n".join([head, "", *[f"- {line}" for line in self.lines]]) + "\n"


def load_gate_params(repo: Path) -> GateParams:
    from stages.common.params import parse_section, read_params

    return parse_section(read_params(repo / "params.yaml").get("gate", {}), GateParams, "gate")


def default_baseline(repo: Path, branch: str = "main") -> str:
    """The newest commit on `branch` that tracks evaluation metrics."""
    log = subprocess.run(["git", "log", "--format=%H", branch, "--", METRICS], cwd=repo, capture_output=True, text=True)
    commits = log.stdout.split()
    if log.returncode != 0 or not commits:
        raise ValueError(f"no commit on '{branch}' has {METRICS}; commit a run first or pass --baseline")
    return commits[0]


def judge(baseline: Run, candidate: Run, params: GateParams) -> GateVerdict:
    """Pure decision on two loaded runs."""
    reasons, lines = [], []
    drop = baseline.metrics["accuracy"] - candidate.metrics["accuracy"]
    significant = True
    if baseline.predictions is not None and candidate.predictions is not None:
        stats = uncertainty(baseline.predictions, candidate.predictions, baseline.name, candidate.name)
        if stats.p_value is not None:
            significant = stats.p_value < 0.05
            lines.append(f"McNemar p = {stats.p_value:.3g} ({stats.verdict})")
    elif params.require_significance:
        lines.append("no paired predictions: significance cannot be tested, so drops count as real")
    counts = not params.require_significance or significant
    lines.insert(0, f"accuracy {baseline.metrics['accuracy']:.4f} -> {candidate.metrics['accuracy']:.4f} "
                    f"(drop {drop:+.4f}, allowed {params.max_accuracy_drop})")
    if drop > params.max_accuracy_drop and counts:
        reasons.append(f"accuracy dropped by {drop:.4f} > {params.max_accuracy_drop} (gate.max_accuracy_drop)")
    for cls, row in baseline.report.items():
        if not isinstance(row, dict) or "avg" in cls or cls not in candidate.report:
            continue
        recall_drop = row["recall"] - candidate.report[cls]["recall"]
        if recall_drop > params.max_recall_drop and counts:
            reasons.append(f"recall of {cls} dropped by {recall_drop:.4f} > {params.max_recall_drop} (gate.max_recall_drop)")
    lines += reasons
    return GateVerdict(not reasons, baseline.name, candidate.name, reasons, lines)


def gate(repo: Path, baseline: str | None = None, candidate: str | None = None) -> GateVerdict:
    params = load_gate_params(repo)
    baseline_rev = baseline or default_baseline(repo)
    return judge(load_run(repo, baseline_rev), load_run(repo, candidate or WORKSPACE), params)
