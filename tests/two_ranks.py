"""Launch pretrain_*.py runs on two DeepSpeed ranks from a test: two GPUs, or two CPU ranks over gloo where there
is no GPU. Every DeepSpeed test of the suite goes through run_two_ranks.

One launch runs several trainings one after the other in the same two processes (a straight run, then a run
resumed from one of its checkpoints, ...): starting the ranks, importing DeepSpeed and opening the process group
cost more than the tiny trainings themselves.

    output = run_two_ranks("pretrain_wm.py", straight_args, resumed_args)

Run as a script (by the launcher, on each rank): `two_ranks.py SCRIPT RUNS_JSON` calls SCRIPT's main(args) for
each argument list of RUNS_JSON in turn and exits with the first non-zero code.
"""

import importlib
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_ranks(script: str, *runs: list) -> str:
    """Run `script`'s main() with each argument list of `runs` in turn, in one `deepspeed --num_gpus=2` launch
    from the repo; the output, after asserting that every run exited cleanly."""
    import pytest
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("two ranks need two GPUs, or none (CPU ranks over gloo)")
    launcher = Path(sys.executable).parent / "deepspeed"
    assert launcher.is_file(), f"no deepspeed launcher next to {sys.executable}"
    with tempfile.TemporaryDirectory() as tmp:
        runs_file = Path(tmp) / "runs.json"
        runs_file.write_text(json.dumps([[str(arg) for arg in args] for args in runs]))
        command = [str(launcher), "--num_gpus=2", "--master_port", str(free_port()), __file__,
                   Path(script).stem, str(runs_file)]
        completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    return output


def main(argv: list[str]) -> int:
    """On each rank: argv = [SCRIPT, RUNS_JSON, (--local_rank=N from the launcher)]."""
    script, runs_file = [arg for arg in argv if not arg.startswith("--local_rank")]
    sys.path.insert(0, str(REPO))
    module = importlib.import_module(script)
    for args in json.loads(Path(runs_file).read_text()):
        code = module.main(args)
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
