"""What every preprocess_*.py main() shares: parsing, the contract for bad input, and the timing of the summary.

    def write(args):                    # check flags, read the source, write the cache
        ...                             # raise ValueError / OSError for user mistakes
        return meta                     # what print_summary needs

    def main(argv=None) -> int:
        return run_preprocessing(argv, build_parser(), write, print_summary)

--help or a usage error returns argparse's exit code (0 or 2) after its own message, instead of raising
SystemExit. A user mistake (ValueError, OSError) prints one `error: ...` line (its white space folded) and
returns 1; Ctrl-C prints that no cache was written and returns 130 (the cache writers leave nothing half-written).
Otherwise print_summary(result, args, seconds) prints the script's summary, seconds being the time since parsing.
"""

import argparse
import sys
import time
from typing import Callable


def run_preprocessing(argv: list[str] | None, parser: argparse.ArgumentParser, write: Callable,
                      print_summary: Callable) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, or a usage error argparse has already printed
        return int(exit_request.code or 0)
    started = time.perf_counter()
    try:
        result = write(args)
    except (ValueError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no cache was written", file=sys.stderr)
        return 130
    print_summary(result, args, time.perf_counter() - started)
    return 0
