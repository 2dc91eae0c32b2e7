"""An EMA of the model's weights as training-loop state (training/task.py: after_step and extra_state).

    state = EMAState(EMA(model, decay), {"vae_checkpoint": ..., ...}, "diffusion_meta.json")
    TrainingTask(..., after_step=state.after_step, extra_state=state)

After every optimizer step the EMA updates; each checkpoint gets ema.safetensors (model/diffusion/ema.py, loadable
with model.pretrained.load_pretrained(dir, ema=True)) and `meta_file`: the run's facts (JSON) that a sampler
needs beside the weights. Resuming restores the EMA from the checkpoint.
"""

import json
from pathlib import Path

from model.diffusion.ema import EMA


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
