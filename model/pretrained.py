"""Checkpoint directories: `config.yaml` (the resolved MegaTransformerConfig) beside `model.safetensors`."""

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model, save_file
from torch import nn

from megatransformer_utils import MegaTransformerConfig
from model.megatransformer_causal import MegaTransformerCausalLM
from model.megatransformer_recurrent import MegaTransformerRecurrentLM

MODEL_CLASSES = {"causal": MegaTransformerCausalLM, "recurrent": MegaTransformerRecurrentLM}


def build_model(config: MegaTransformerConfig) -> nn.Module:
    """A freshly initialised model of the family the config names."""
    return MODEL_CLASSES[config.model_family](config)


def write_model_files(model: nn.Module, directory: Path) -> None:
    """config.yaml and model.safetensors into an existing directory (not atomic: see save_pretrained)."""
    model.config.to_yaml(directory / "config.yaml")
    save_file(unique_tensors(model), str(directory / "model.safetensors"))


def unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied parameters stored once (under their first name), each as its own contiguous copy
    (DeepSpeed keeps parameters as views into flat buffers, which safetensors refuses to save)."""
    tensors, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors[name] = tensor.detach().contiguous().clone()
    return tensors


def save_pretrained(model: nn.Module, directory) -> Path:
    """Write model.config and weights to `directory` atomically (a temp dir renamed into place)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write_model_files(model, staging)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)  # left by a save killed between the two renames
            directory.rename(old)
            staging.rename(directory)
            shutil.rmtree(old)
        else:
            staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def load_pretrained(directory, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """The eval-mode model saved in `directory` by save_pretrained (or convert_hf_checkpoint.py)."""
    directory = Path(directory)
    config_path, weights_path = directory / "config.yaml", directory / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a checkpoint directory holds config.yaml and model.safetensors "
                                    "(written by save_pretrained or convert_hf_checkpoint.py)")
    model = build_model(MegaTransformerConfig.from_yaml(config_path))
    load_weights(model, weights_path, device)
    return model.to(device=device, dtype=dtype).eval()


def load_weights(model: nn.Module, weights_path: Path, device: str | torch.device = "cpu") -> None:
    """Load model.safetensors into `model` in place; every parameter must match by name and shape."""
    missing, unexpected = load_model(model, str(weights_path), strict=False, device=str(device))
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
