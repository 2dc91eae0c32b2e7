"""What every pretrain_*.py main() shares: logging, the contract for bad input, and the closing lines.

    def prepare(args):                      # check flags, resolve the config, open the caches
        ...                                 # raise ValueError / FileNotFoundError for user mistakes
        return build_task, report           # build_task(context) -> TrainingTask; report(summary) -> str

    def report(summary):                    # opens with the line every script shares
        return finished_line(summary, f"{summary['tokens']:,} images", f"DiT '{config.name}'") + ...

    def main(argv=None) -> int:
        return run_training(argv, parse_args, prepare)

A user mistake (ValueError, FileNotFoundError) or a stopped run (TrainingStopped) prints one `error: ...`
line on rank 0 and returns 1; no traceback. After training, rank 0 prints the script's report, the last
checkpoint and the command that opens TensorBoard on the run.
"""

import logging
import os
import sys
from typing import Callable

from training.loop import TrainingStopped, start_run, train


def run_training(argv, parse_args: Callable, prepare: Callable) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("training").setLevel(logging.INFO)  # the loop's messages (evaluations, stops) without a bar
    args = parse_args(argv)
    is_rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        build_task, report = prepare(args)
        context = start_run(args)
        summary = train(build_task(context), args, context)
    except (ValueError, FileNotFoundError, TrainingStopped) as error:
        if is_rank0:
            print(f"error: {error}", file=sys.stderr)
        return 1
    if is_rank0:
        print(report(summary))
        print(f"\ncheckpoint: {summary.get('checkpoint')}")
        print(f"TensorBoard: ./tensorboard.sh 6006 {summary['run_dir']}   (then open http://localhost:6006)")
    return 0


def finished_line(summary: dict, seen: str, details: str = "") -> str:
    """The first line of a report, after a blank one: `finished RUN_DIR at step N (SEEN, K skipped non-finite;
    DETAILS)`. SEEN says how much data the run saw (the summary's `tokens`, in the script's unit); DETAILS, left out
    when empty, whatever else the script tells about the run (the model, the learning rate, ...)."""
    return (f"\nfinished {summary['run_dir']} at step {summary['step']} ({seen}, {summary['skipped_nonfinite']} "
            f"skipped non-finite{f'; {details}' if details else ''})")
