"""An EMA of the model's weights as training-loop state (training/task.py: after_step and extra_state).

    state = EMAState(EMA(model, decay), {"vae_checkpoint": ..., ...}, "diffusion_meta.json")
    TrainingTask(..., after_step=state.after_step, extra_state=state)
    metrics = state.evaluate(eval_model, val_batches, measure, device)   # + eval/ema_loss, with the EMA weights
    with state.sampling(eval_model):                                      # eval mode and the EMA weights
        ...

After every optimizer step the EMA updates; each checkpoint gets ema.safetensors (model/diffusion/ema.py, loadable
with model.pretrained.load_pretrained(dir, ema=True)) and `meta_file`: the run's facts (JSON) that a sampler
needs beside the weights. Resuming restores the EMA from the checkpoint.
"""

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from model.diffusion.ema import EMA
from training.loop import evaluate_means


class EMAState:
    """The EMA weights as the loop's after_step and extra_state; each checkpoint also gets `meta_file`."""

    def __init__(self, ema: EMA, run_meta: dict, meta_file: str):
        self.ema, self.run_meta, self.meta_file = ema, run_meta, meta_file

    def after_step(self, model, step: int) -> None:
        self.ema.update(model)

    def save(self, directory: Path) -> None:
        self.ema.save(directory)
        (Path(directory) / self.meta_file).write_text(json.dumps(self.run_meta, indent=2) + "\n")

    def load(self, directory: Path) -> None:
        self.ema.load(directory)

    def evaluate(self, model: nn.Module, batches: list, measure: Callable, device: torch.device) -> dict:
        """{"eval/NAME": mean} of measure(model, batch) over `batches` (training/loop.py: evaluate_means) with the
        trained weights, and "eval/ema_loss": the mean "loss" with the EMA weights swapped in."""
        metrics = {f"eval/{name}": value for name, value in evaluate_means(model, batches, measure, device).items()}
        with self.ema.swapped_into(model):
            metrics["eval/ema_loss"] = evaluate_means(model, batches, measure, device)["loss"]
        return metrics

    @contextmanager
    def sampling(self, model: nn.Module):
        """Inside the block `model` is in eval mode with the EMA weights; its own weights come back afterwards
        (even on error) and its mode on a normal exit."""
        was_training = model.training
        model.eval()
        with self.ema.swapped_into(model):
            yield model
        model.train(was_training)
