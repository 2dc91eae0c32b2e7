"""The training speed a run logged: mean train/<unit>_per_sec and train/mfu over its logged windows, the first
one (start-up, and compilation under --torch_compile) left out.

    python bench/run_speed.py runs/my_run [runs/other_run ...]

Used by bench/gpu_check.sh to report the pretrain_wm.py runs; reads the TensorBoard events of each run.
"""

import argparse
import statistics
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def run_speed(run_dir: Path) -> dict:
    """{tag: (mean after the first window, value of the first window, windows)} for the run's throughput tags."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    result = {}
    for tag in accumulator.Tags()["scalars"]:
        if tag.endswith("_per_sec") or tag in ("train/mfu", "train/loss"):
            values = [event.value for event in accumulator.Scalars(tag)]
            rest = values[1:] or values
            result[tag] = (statistics.mean(rest), values[0], len(values))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        if not any(run_dir.glob("events.out.tfevents.*")):
            print(f"{run_dir}: no TensorBoard events (did the run start?)")
            continue
        speed = run_speed(run_dir)
        parts = [f"{tag.removeprefix('train/')} {mean:,.4g} (first window {first:,.4g}, {n} windows)"
                 for tag, (mean, first, n) in sorted(speed.items())]
        print(f"{run_dir.name}: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
