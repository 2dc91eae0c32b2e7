"""An exponential moving average of a model's weights, for evaluation and sampling.

    ema = EMA(model, decay=0.9999)
    ...after each optimizer step:  ema.update(model)
    with ema.swapped_into(model):  # the averaged weights, then the trained ones back
        latents = sample(model, ...)
    ema.save(checkpoint_dir)       # ema.safetensors: loads into the model like model.safetensors

The shadow weights are float32 whatever the model's dtype (DeepSpeed bf16 keeps bfloat16 weights), keyed by
parameter name. With warmup, update n (0-based) uses decay min(decay, (1 + n) / (10 + n)) as diffusers'
EMAModel does, so early averages are not dominated by the random initialisation.
"""

from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

FILE_NAME = "ema.safetensors"


class EMA:
    """Shadow copies (float32) of every floating-point parameter of `model`."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()
                       if p.is_floating_point()}

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    def _pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        parameters = {name: p for name, p in model.named_parameters() if p.is_floating_point()}
        if parameters.keys() != self.shadow.keys():
            missing, extra = self.shadow.keys() - parameters.keys(), parameters.keys() - self.shadow.keys()
            raise ValueError(f"the model's parameters do not match the EMA's: the model lacks {sorted(missing)[:5]} "
                             f"and has {sorted(extra)[:5]} in addition; build the EMA from this model")
        return [(parameters[name], shadow) for name, shadow in self.shadow.items()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow = decay * shadow + (1 - decay) * parameter, for every parameter."""
        weight = 1.0 - self.current_decay()
        for parameter, shadow in self._pairs(model):
            shadow.lerp_(parameter.detach().to(device=shadow.device, dtype=torch.float32), weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the averages (e.g. before saving an EMA checkpoint)."""
        for parameter, shadow in self._pairs(model):
            parameter.copy_(shadow)

    @contextmanager
    def swapped_into(self, model: nn.Module):
        """Inside the block the model holds the averaged weights; its own come back afterwards, even on error."""
        pairs = self._pairs(model)
        with torch.no_grad():
            saved = [parameter.detach().clone() for parameter, _ in pairs]
            for parameter, shadow in pairs:
                parameter.copy_(shadow)
        try:
            yield model
        finally:
            with torch.no_grad():
                for (parameter, _), original in zip(pairs, saved):
                    parameter.copy_(original)

    def to(self, device: torch.device | str) -> "EMA":
        """Move the shadow weights (e.g. to the CPU to save accelerator memory)."""
        self.shadow = {name: tensor.to(device) for name, tensor in self.shadow.items()}
        return self

    def state_dict(self) -> dict:
        """{"decay", "warmup", "num_updates", "shadow": {name: float32 tensor}}, for torch.save in checkpoints."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {name: tensor.clone() for name, tensor in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["shadow"].keys() != self.shadow.keys():
            raise ValueError("this EMA state belongs to a different model: its parameter names differ")
        for name, tensor in state["shadow"].items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state for '{name}' has shape {tuple(tensor.shape)}, "
                                 f"the model's is {tuple(self.shadow[name].shape)}")
        self.decay, self.warmup, self.num_updates = state["decay"], state["warmup"], state["num_updates"]
        self.shadow = {name: tensor.to(device=self.shadow[name].device, dtype=torch.float32).clone()
                       for name, tensor in state["shadow"].items()}

    def save(self, directory) -> Path:
        """Write the shadow weights to directory/ema.safetensors, keyed like the model's parameters (so
        model.pretrained.load_pretrained(directory, ema=True) loads them), with decay, warmup and num_updates as metadata."""
        path = Path(directory) / FILE_NAME
        metadata = {"decay": repr(self.decay), "warmup": str(self.warmup), "num_updates": str(self.num_updates)}
        save_file({name: tensor.cpu().contiguous() for name, tensor in self.shadow.items()}, str(path), metadata=metadata)
        return path

    def load(self, directory) -> None:
        """Restore what save(directory) wrote."""
        path = Path(directory) / FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the checkpoint was written without EMA weights; "
                                    "resume it without EMA or from a checkpoint that has them")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        self.load_state_dict({"decay": float(metadata["decay"]), "warmup": metadata["warmup"] == "True",
                              "num_updates": int(metadata["num_updates"]), "shadow": load_file(str(path))})
