"""The default against the first default, trained one after the other on the same machine.

Both presets train on the same split of the archive (the train stage's recipe and input pipeline,
through benchmarks/gpu_recipe.py), then each prints its test accuracy (with its own
preset's test-time augmentation), its training seconds and their ratio to the reference's, and the
training seconds at which validation accuracy first reached each target. Per-epoch records go to
--out-dir as they happen; a preset whose finished record is already there is not trained again
(a race cut short resumes, a new candidate meets the same sitting's reference). A benchmark, not a test: the two 16-epoch runs take 40 minutes on the
AVX-512 EPYC and over two hours on the AVX2 one.

    python benchmarks/default_vs_first.py --archive ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/default_vs_first.py --archive ... --presets default first-default --targets 0.85 0.9
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # here on the CPU; gpu_recipe's default is JAX

from gpu_recipe import Record, accuracy_on_test, first_reaching, fit_recipe, load_data, pick_policy, recipe

from stages.common.errors import ConfigError, run_main
from stages.common.provenance import cpu_info


def race(archive: Path, presets: list[str], targets: list[float], out_dir: Path, epochs: int | None) -> list[dict]:
    shared = recipe(presets[0], [])[1]
    for preset in presets:
        if recipe(preset, [])[1] != shared:
            raise ConfigError(f"preset {preset} prepares the data differently from {presets[0]}; "
                              "compare presets with the same prepare section")
    data = load_data(archive, shared)
    out_dir.mkdir(parents=True, exist_ok=True)  # only once the presets and the archive are known good
    rows = []
    for preset in presets:
        finished = finished_record(out_dir / f"{preset}.json")
        if finished:  # a race cut short, or a new candidate against the same sitting's reference
            print(f"{preset}: reusing the finished record in {out_dir} (delete it to train again)", flush=True)
            rows.append(row_of(finished, targets))
            continue
        train_params, _prepare, evaluate_params = recipe(preset, [f"train.epochs={epochs}"] if epochs else [])
        policy, devices = pick_policy(train_params)
        record = Record(out_dir / f"{preset}.json", {"preset": preset, "policy": policy, "device": devices[0]})
        model, fit_seconds = fit_recipe(train_params, data, record, jit_compile=train_params.xla,
                                         precision=policy)
        accuracy = accuracy_on_test(model, data, evaluate_params.tta_flip, evaluate_params.tta_translate)
        reached = {str(t): first_reaching(record.epochs, t) for t in targets}
        record.write(test_accuracy=accuracy, fit_seconds=round(fit_seconds, 1), reached=reached)
        rows.append(row_of(finished_record(record.out), targets))
    return rows


def finished_record(path: Path) -> dict | None:
    """A preset's record that got as far as its test accuracy, else None."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if "test_accuracy" in record else None


def row_of(record: dict, targets: list[float]) -> dict:
    return {"preset": record["preset"], "test_accuracy": record["test_accuracy"], "fit_seconds": record["fit_seconds"],
            "epochs": len(record["epochs"]), "policy": record["policy"],
            "reached": {str(t): first_reaching(record["epochs"], t) for t in targets}}


def render(rows: list[dict], targets: list[float], cpu: dict) -> str:
    reference = rows[-1]
    lines = [f"CPU: {cpu['model']} ({', '.join(cpu['isa']) or 'no AVX2'}); time ratio against {reference['preset']}",
             "", "| preset | precision | epochs | test accuracy | training s | time ratio | "
             + " | ".join(f"val {t}" for t in targets) + " |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(targets)]
    for row in rows:
        hits = [row["reached"][str(t)] for t in targets]
        cells = [f"{hit[1]:.0f} s (epoch {hit[0]})" if hit else "not reached" for hit in hits]
        lines.append(f"| {row['preset']} | {row['policy']} | {row['epochs']} | {row['test_accuracy']:.4f} | "
                     f"{row['fit_seconds']:.0f} | {row['fit_seconds'] / reference['fit_seconds']:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, required=True, help="class-folder archive (the offline mirror)")
    parser.add_argument("--presets", nargs="+", default=["default", "first-default"],
                        help="the last one is the reference the time ratios are taken against")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.85, 0.88, 0.90])
    parser.add_argument("--epochs", type=int, help="train every preset this long instead (a quick check of the set-up)")
    parser.add_argument("--out-dir", type=Path, default=Path("default_vs_first"))
    args = parser.parse_args()
    rows = race(args.archive, args.presets, args.targets, args.out_dir, args.epochs)
    text = render(rows, args.targets, cpu_info())
    (args.out_dir / "summary.md").write_text(text + "\n")
    print(json.dumps(rows))
    print(text)


if __name__ == "__main__":
    run_main(main)
