"""AdamW with decoupled weight decay on matrices only, and a linear-warmup cosine learning-rate schedule."""

import math

import torch
from torch import nn


FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def make_optimizer(model: nn.Module, learning_rate: float, weight_decay: float,
                   betas: tuple[float, float]) -> torch.optim.AdamW:
    """Decay 2-D+ weights (matmuls, embeddings); leave norms and biases undecayed, as in GPT-2/nanoGPT.

    The update runs in PyTorch's fused AdamW kernel where the parameters live on a CPU or CUDA device (as nanoGPT
    does on CUDA). PyTorch's default is one tensor at a time on a CPU and its `foreach` kernels on CUDA; the fused
    kernel does the same arithmetic in one pass over each tensor and is several times faster on a CPU
    (bench/adamw_speed.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused or None)


def warmup_cosine(warmup_steps: int, max_steps: int, min_lr_ratio: float):
    """The multiplier of the peak learning rate after `step` optimizer steps: linear warmup from
    1/warmup_steps to 1, then cosine decay to min_lr_ratio at max_steps."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int,
                   min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, max_steps, min_lr_ratio))
