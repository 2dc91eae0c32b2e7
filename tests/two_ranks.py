"""Launch a pretrain_*.py on two DeepSpeed ranks from a test: two GPUs, or two CPU ranks over gloo where there is
no GPU. Every DeepSpeed test of the suite goes through run_two_ranks."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_ranks(script: str, args: list) -> str:
    """Run `deepspeed --num_gpus=2 script *args` in the repo; its output, after asserting it exited cleanly."""
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("two ranks need two GPUs, or none (CPU ranks over gloo)")
    launcher = Path(sys.executable).parent / "deepspeed"
    assert launcher.is_file(), f"no deepspeed launcher next to {sys.executable}"
    command = [str(launcher), "--num_gpus=2", "--master_port", str(free_port()), script, *map(str, args)]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    return output
