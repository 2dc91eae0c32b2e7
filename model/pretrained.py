"""Checkpoint directories of every model family: `config.yaml` (the resolved config, whose `model_family` says what
it builds: model/families.py) beside `model.safetensors` (and `ema.safetensors` for diffusion runs).

    model = load_pretrained("runs/RUN/checkpoint-1000")                        # any family, eval mode
    vocoder = load_pretrained(checkpoint, "cuda", family="vocoder")           # ValueError for another family
    dit = load_pretrained(checkpoint, family="image_diffusion", ema=True)     # the EMA weights
    save_pretrained(model, "runs/example")                                    # written atomically
"""

import json
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_model, save_file
from torch import nn

from model.diffusion.ema import FILE_NAME as EMA_FILE
from model.families import FAMILIES, family_of

DIFFUSION_META = "diffusion_meta.json"  # a diffusion run's facts beside its weights (training/ema_state.py)


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


def read_config(directory):
    """The config of a checkpoint directory's config.yaml, of the class its family reads (model/families.py)."""
    path = Path(directory) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a checkpoint directory holds config.yaml and model.safetensors "
                                "(written by a pretrain_*.py run as runs/RUN/checkpoint-STEP, by save_pretrained or by "
                                "convert_hf_checkpoint.py)")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of config keys to values")
    family = family_of(values)
    return FAMILIES[family].config_class.from_yaml(path)


def load_pretrained(directory, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, *,
                    family: str | tuple | None = None, ema: bool = False, config=None) -> nn.Module:
    """The eval-mode model of a checkpoint directory, of the family its config.yaml records.

    family: the family (or families) the caller can use: ValueError naming the checkpoint's otherwise.
    ema: load ema.safetensors (the exponential moving average a diffusion run keeps) instead of model.safetensors.
    config: the config to build when the directory has no config.yaml (early image VAE checkpoints); by default
    config.yaml is required. dtype: None keeps the built model's (float32)."""
    directory = Path(directory)
    config = config if config is not None else read_config(directory)
    wanted = (family,) if isinstance(family, str) else family
    if wanted and config.model_family not in wanted:
        raise ValueError(f"{directory} holds a {config.model_family} model (its config.yaml says so), not a "
                         f"{' or '.join(wanted)} one: pass a checkpoint of that family")
    weights_path = directory / (EMA_FILE if ema else "model.safetensors")
    if not weights_path.is_file():
        written_by = "a diffusion run with EMA" if ema else "save_pretrained or a pretrain_*.py run"
        raise FileNotFoundError(f"{weights_path} not found: pass a checkpoint directory written by {written_by} "
                                "(runs/RUN/checkpoint-STEP)")
    model_family = FAMILIES[config.model_family]
    module = model_family.build(config)
    load_weights(module, weights_path, device)
    return model_family.unwrap(module).to(device=device, dtype=dtype).eval()


def load_weights(model: nn.Module, weights_path: Path, device: str | torch.device = "cpu") -> None:
    """Load model.safetensors into `model` in place; every parameter must match by name and shape."""
    missing, unexpected = load_model(model, str(weights_path), strict=False, device=str(device))
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")


def load_diffusion_checkpoint(checkpoint, family: str, use_ema: bool = True,
                              device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The eval-mode, frozen denoiser of a `family` diffusion run's checkpoint (its EMA weights, or the trained
    ones) and the run's diffusion_meta.json (what a sampler needs beside the weights: VAE, scales, encoders)."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / DIFFUSION_META).is_file():
        raise FileNotFoundError(f"{checkpoint} has no {DIFFUSION_META}: pass a checkpoint directory written by "
                                f"pretrain_{family}.py (runs/RUN_NAME/checkpoint-STEP)")
    model = load_pretrained(checkpoint, device, family=family, ema=use_ema)
    return model.requires_grad_(False), json.loads((checkpoint / DIFFUSION_META).read_text())
