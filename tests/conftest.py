"""Settings for the whole suite.

The models under test are tiny: torch's intra-op threads gain nothing on them, and on a 2-core machine (CI, or
one shared with other jobs) their synchronisation makes every small op wait, 5-50x slower. The suite runs on
one thread, and the processes it launches (DeepSpeed ranks, CLI subprocesses) inherit OMP_NUM_THREADS=1. One
setting for the whole session also keeps a straight and a resumed run on the same thread count, which exact
resume comparisons rely on.
"""

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = omp


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """Every test starts with PyTorch's full float32 matmuls: a training run on a GPU switches them to TF32
    (training/precision.py), which would loosen later comparisons in the same process."""
    yield
    torch.set_float32_matmul_precision("highest")
