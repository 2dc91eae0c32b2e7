"""Rank bookkeeping. Ranks come from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK);
without a launcher the run is a single rank 0."""

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def choose_device(requested: str | None) -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available (or requested), else cpu."""
    if requested == "cpu" or (requested is None and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(use_deepspeed: bool, device: torch.device) -> None:
    """Start the process group for DeepSpeed: NCCL on GPUs, gloo on CPU ranks."""
    if use_deepspeed and not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def union_over_ranks(names) -> list[str]:
    """The sorted union of every rank's `names`."""
    if not dist.is_initialized():
        return sorted(names)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(names))
    return sorted(set().union(*gathered))


def broadcast_flag(flag: bool) -> bool:
    """True on every rank if it is True on any rank (e.g. a stop signal seen by one of them)."""
    if not dist.is_initialized():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def micro_batch_seed(seed: int, rank: int, index: int) -> int:
    """The generator seed of micro-batch `index` of `rank`: a pure function of its arguments."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + index) % 2 ** 63
