"""Training throughput under TensorFlow's thread settings, each in its own process, in turns.

TensorFlow sizes its intra-op pool (the threads one op splits over) and its inter-op pool (ops run
side by side) once, when it starts, from TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS (0 or
unset: its own choice). So each setting gets a fresh process running
`benchmarks/throughput.py --alone` (the train stage's pipeline and model, random images); the
settings take turns for --rounds rounds, so a slow spell of a shared machine hits all of them.
Each setting's figure is the median over rounds of its processes' fastest epoch, with its ratio to
the first setting's (by default TensorFlow's own choice). Rows go to --out as processes finish.

    python benchmarks/threads.py --images 2048 --rounds 2
    python benchmarks/threads.py --threads 0,0 1,0 --preset first-default
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from stages.common.errors import ConfigError, StageFailed, run_main
from stages.common.provenance import cpu_info

THROUGHPUT = Path(__file__).resolve().parent / "throughput.py"


def parse_setting(text: str) -> tuple[int, int]:
    intra, comma, inter = text.partition(",")
    try:
        setting = (int(intra), int(inter))
    except ValueError:
        setting = (-1, -1)
    if not comma or min(setting) < 0:
        raise ConfigError(f"--threads {text}: expected INTRA,INTER thread counts (0: TensorFlow's choice), e.g. 1,0")
    return setting


def label(setting: tuple[int, int]) -> str:
    return ", ".join(f"{pool} {n if n else 'auto'}" for pool, n in zip(("intra", "inter"), setting))


def time_setting(setting: tuple[int, int], throughput_args: list[str]) -> dict:
    """One process of throughput.py --alone under these thread counts; its JSON result."""
    env = {**os.environ, "TF_NUM_INTRAOP_THREADS": str(setting[0]), "TF_NUM_INTEROP_THREADS": str(setting[1])}
    completed = subprocess.run([sys.executable, str(THROUGHPUT), "--alone", *throughput_args], env=env,
                          capture_output=True, text=True)
    if completed.returncode != 0:
        last = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        raise StageFailed(f"throughput.py ({label(setting)})", last.removeprefix("error: "), completed.returncode)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def summarise(rows: list[dict], settings: list[tuple[int, int]]) -> list[dict]:
    """Per setting: the median over rounds of each process's fastest epoch, and its ratio to the first setting's."""
    per_round = {s: [r["pipeline_images_per_s"] for r in rows if tuple(r["threads"]) == s] for s in settings}
    medians = {s: statistics.median(values) for s, values in per_round.items()}
    return [{"threads": label(s), "images_per_s": round(medians[s], 1), "per_round": per_round[s],
             f"over {label(settings[0])}": round(medians[s] / medians[settings[0]], 3)} for s in settings]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", nargs="+", default=["0,0", "0,1", "1,0", "1,1"], metavar="INTRA,INTER",
                        help="thread settings to time; the first is the reference (default: 0,0 0,1 1,0 1,1)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--preset")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2, help="timed epochs per process (the fastest counts)")
    parser.add_argument("--out", type=Path, default=Path("threads.jsonl"))
    args = parser.parse_args()
    settings = [parse_setting(text) for text in args.threads]
    throughput_args = ["--images", str(args.images), "--repeats", str(args.repeats)]
    if args.preset:
        throughput_args += ["--preset", args.preset]
    machine = {**cpu_info(), "logical_cpus": os.cpu_count()}
    print(json.dumps({"machine": machine}), flush=True)
    rows = []
    args.out.unlink(missing_ok=True)  # one sitting per file: medians never mix machines or days
    for round_ in range(args.rounds):
        for setting in settings:
            row = {"round": round_, "threads": list(setting), "machine": machine,
                   **time_setting(setting, throughput_args)}
            rows.append(row)
            with args.out.open("a") as out:
                out.write(json.dumps(row) + "\n")
            print(f"round {round_}, {label(setting)}: {row['pipeline_images_per_s']} images/s", flush=True)
    for line in summarise(rows, settings):
        print(json.dumps(line))


if __name__ == "__main__":
    run_main(main)
