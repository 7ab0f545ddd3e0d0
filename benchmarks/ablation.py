"""Ablation: what each of the default's ingredients buys, at a fixed short budget.

Trains the preset (the default unless --preset says otherwise) once in full and once without each
ingredient (leave-one-out: the others stay, as they were tuned together), every run for the same
--epochs on the same split of the archive, and scores each trained model on the test split under
every test-time augmentation setting (no TTA, flip, flip + 1 px and 2 px translations: evaluation
only, no extra training). Rows are appended to --out as each run finishes (a cut-short ablation
keeps its rows); the Markdown table is printed at the end, or from --out alone with --table.

    python benchmarks/ablation.py --archive ../shared/data/cifar10-jpeg.tar.gz --epochs 4 --set train.warmup_epochs=0.92
    python benchmarks/ablation.py --archive ... --epochs 8 --only full whiten
    python benchmarks/ablation.py --table --out ablation.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # here on the CPU; gpu_recipe's default is JAX

from gpu_recipe import Data, Record, accuracy_on_test, fit_recipe, load_data, pick_policy, recipe

# Each of the default's ingredients as the train.* keys that take it out (docs/pipeline.md, "Training recipe").
WITHOUT: dict[str, list[str]] = {
    "full": [],
    "whiten": ["train.arch.fast_vgg.whiten=false"],
    "identity_init": ["train.arch.fast_vgg.identity_init=false"],
    "bn_no_scale_short_momentum": ["train.arch.fast_vgg.bn_scale=true", "train.arch.fast_vgg.bn_momentum=0.99"],
    # The pair's halves apart (Keras' BatchNorm defaults: a trained scale, momentum 0.99).
    "bn_no_scale": ["train.arch.fast_vgg.bn_scale=true"],
    "bn_short_momentum": ["train.arch.fast_vgg.bn_momentum=0.99"],
    "bias_lr_scale": ["train.bias_lr_scale=1"],
    "logit_scale": ["train.arch.fast_vgg.logit_scale=1"],
    "lookahead": ["train.lookahead=false"],
    "whole_pixel_crops": ["train.augment.crop_interpolation=bilinear"],
    # airbench's flips: each image mirrored in every other epoch; without them, at random.
    "alternating_flips": ["train.augment.flip=true"],
    # Not an ingredient of accuracy: float32 where `mixed_precision: auto` picks bfloat16, to see
    # what the faster arithmetic costs.
    "bfloat16": ["train.mixed_precision=false"],
}
TTA = {"none": (False, 0), "flip": (True, 0), "flip+translate1": (True, 1), "flip+translate2": (True, 2)}


def run(name: str, args: argparse.Namespace, data: Data) -> dict:
    train_params, _prepare, _evaluate = recipe(args.preset, [*args.set, *WITHOUT[name], f"train.epochs={args.epochs}"])
    policy, devices = pick_policy(train_params)
    record = Record(args.out.with_suffix(f".{name}.{args.epochs}.json"), {"variant": name})
    model, fit_seconds = fit_recipe(train_params, data, record, jit_compile=train_params.xla, precision=policy)
    return {"variant": name, "preset": args.preset, "epochs": args.epochs, "sets": [*args.set, *WITHOUT[name]],
            "fit_seconds": round(fit_seconds, 1), "val_accuracy": record.epochs[-1]["val_accuracy"],
            "test_accuracy": {tta: accuracy_on_test(model, data, *setting) for tta, setting in TTA.items()},
            "policy": policy, "device": devices[0], "train_images": len(data.train_idx)}


def table(rows: list[dict]) -> str:
    lines = [f"| without | epochs | {' | '.join(f'test, {tta}' for tta in TTA)} | fit seconds |",
             "|---|---:|" + "---:|" * len(TTA) + "---:|"]
    full = {row["epochs"]: row for row in rows if row["variant"] == "full"}
    for row in rows:
        cells = []
        for tta, accuracy in row["test_accuracy"].items():
            reference = full.get(row["epochs"])
            delta = f" ({accuracy - reference['test_accuracy'][tta]:+.4f})" if reference and reference is not row else ""
            cells.append(f"{accuracy:.4f}{delta}")
        label = "(nothing: the full recipe)" if row["variant"] == "full" else row["variant"]
        lines.append(f"| {label} | {row['epochs']} | {' | '.join(cells)} | {row['fit_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, help="class-folder archive (the offline mirror)")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--only", nargs="+", choices=list(WITHOUT), default=list(WITHOUT))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params key for every run, e.g. train.warmup_epochs=0.9 (before the ingredient's own); "
                             "prepare.* keys change the one split all runs share")
    parser.add_argument("--out", type=Path, default=Path("ablation.jsonl"))
    parser.add_argument("--table", action="store_true", help="only print the table of the rows in --out")
    args = parser.parse_args()
    if not args.table:
        if args.archive is None:
            parser.error("--archive is required to train (or pass --table to print the rows in --out)")
        # One split for every run: the ingredients are train.* keys; a --set prepare.* key applies to all.
        data = load_data(args.archive, recipe(args.preset, args.set)[1])
        for name in args.only:
            row = run(name, args, data)
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    print(table(rows))


if __name__ == "__main__":
    main()
