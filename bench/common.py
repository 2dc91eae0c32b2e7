"""What the bench scripts share (and the only bench module they import): the main() of a measuring script, and
timing helpers of the speed scripts.

    def main(argv=None) -> int:         # parse -> measure -> write the report's JSON -> print it
        return measure_and_report(build_parser(), measure, lambda args, report: Path(report["output_dir"]) / "x.json",
                                  print_report, argv)
    times = interleaved_times({"ours": f, "reference": g}, warmup=2, repeats=10, device="cpu")   # {name: [s, ...]}

    add_speed_arguments(parser, steps=10)   # --warmup --steps --dtype --device --seed of a speed script
    device_name = start_speed_run(args)     # checks --device, applies --threads
"""

import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def measure_and_report(parser, measure: Callable, json_path: Callable, print_report: Callable, argv=None) -> int:
    """A measuring script's main: args = parser.parse_args(argv); report = measure(args) (a ValueError or
    FileNotFoundError is a user mistake: printed as `error: ...`, exit status 1); the report is written as JSON to
    json_path(args, report) (its folder created), then print_report(report, that path) shows it. Returns 0."""
    args = parser.parse_args(argv)
    try:
        report = measure(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    path = Path(json_path(args, report))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report, path)
    return 0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    """Seconds one call of fn takes, with the device synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved_times(fns: dict, warmup: int, repeats: int, device: str) -> dict:
    """Seconds per call of each fn in fns (a list of `repeats` each), run in alternating order per repeat."""
    times = {name: [] for name in fns}
    names = list(fns)
    for i in range(warmup + repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            seconds = timed(fns[name], device)
            if i >= warmup:
                times[name].append(seconds)
    return times


def add_speed_arguments(parser, steps: int) -> None:
    """The flags of a speed script that times ours against a reference: --warmup, --steps (timed repeats, default
    `steps`), --dtype (a key of DTYPES), --device and --seed."""
    parser.add_argument("--warmup", type=int, default=2, help="untimed repeats per model and measurement")
    parser.add_argument("--steps", type=int, default=steps, help="timed repeats per model and measurement")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)


def start_speed_run(args) -> str:
    """Exit with a message when --device cuda has no GPU; apply --threads (if given); return the device's name."""
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda was asked for but torch.cuda.is_available() is False; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.cuda.get_device_name() if args.device == "cuda" else cpu_model()
