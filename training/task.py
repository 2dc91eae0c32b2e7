"""What a pretrain_*.py hands the training loop: a `TrainingTask` (the model, its batches, its loss, evaluation
and samples) and, for GANs, an `Adversary` (the discriminator, its loss, when it starts, its learning rate).

The loop calls, for each micro-batch of optimizer step `step` (0-based):

    terms = task.loss(model, batch, step)                         # without an adversary
    terms = task.loss(model, batch, step, discriminator)          # with one (None before its start_step)
    d_terms = adversary.loss(discriminator, batch, outputs)       # outputs = terms.outputs, detached

A loss returns a scalar tensor or `LossTerms` (the scalar plus named values to log and outputs for the
adversary). The model's loss gets the discriminator's plain nn.Module with its parameters frozen, so the
model's backward pass never writes into the discriminator's gradients; the adversary's loss gets the
discriminator as its engine runs it (DeepSpeed's engine under --use_deepspeed).
"""

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn


@dataclass
class LossTerms:
    """loss: the scalar to backpropagate. logs: named scalars (tensors or floats) averaged over the logging
    window and written as `train/<name>`. outputs: tensors handed to the adversary's loss (detached)."""

    loss: torch.Tensor
    logs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)


def as_loss_terms(value) -> LossTerms:
    if isinstance(value, LossTerms):
        return value
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        return LossTerms(loss=value)
    raise TypeError(f"a loss function must return a scalar tensor or LossTerms, got {type(value).__name__}")


@dataclass
class Adversary:
    """A second network trained against the model with its own optimizer (under DeepSpeed, its own engine).

    module: the discriminator. loss(discriminator, batch, outputs) → scalar or LossTerms.
    start_step: before this optimizer step the discriminator neither trains nor reaches the model's loss.
    learning_rate: its peak learning rate (default --learning_rate); its warmup-cosine schedule runs over the
    steps from start_step to --max_steps. name: its folder in each checkpoint and its TensorBoard prefix."""

    module: nn.Module
    loss: Callable
    start_step: int = 0
    learning_rate: Optional[float] = None
    name: str = "discriminator"


@dataclass
class Audio:
    """A sample for TensorBoard's audio tab. waveform: (S,) float in [-1, 1]."""

    waveform: torch.Tensor
    sample_rate: int


@dataclass
class Image:
    """A sample for TensorBoard's image tab. pixels: (3, H, W) float in [0, 1] or uint8."""

    pixels: torch.Tensor


@dataclass
class TrainingTask:
    """model: the nn.Module to train. config: its YamlConfig (saved as config.yaml beside its weights).
    train_batch(i): this rank's i-th micro-batch, a dict of CPU tensors; a pure function of i (exact resume).
    loss: see the module docstring. batch_size(batch): how many `throughput_unit`s a batch holds (tokens,
    images, audio seconds...), logged as train/<unit>_per_sec.
    evaluate(model) → {"eval/...": value}, called on every rank (results already reduced over ranks).
    samples(model) → {tag: str | Audio | Image} for TensorBoard every `generation_steps` (every rank calls it).
    flops_per_token: training FLOPs per throughput unit, for MFU on GPUs. adversary: a GAN discriminator.
    after_step(model, step): called on every rank after each optimizer step (e.g. to update EMA weights).
    extra_state: what else a checkpoint holds (e.g. the EMA weights): an object with save(directory), called on
    rank 0 into each checkpoint, and load(directory), called on every rank when resuming."""

    model: nn.Module
    config: object
    train_batch: Callable[[int], dict]
    loss: Callable
    batch_size: Callable[[dict], float]
    throughput_unit: str = "tokens"
    evaluate: Optional[Callable[[nn.Module], dict]] = None
    samples: Optional[Callable[[nn.Module], dict]] = None
    flops_per_token: Optional[float] = None
    generation_steps: Optional[int] = None
    adversary: Optional[Adversary] = None
    after_step: Optional[Callable[[nn.Module, int], None]] = None
    extra_state: Optional[object] = None
