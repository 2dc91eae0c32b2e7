"""DiffusionConfig: the DiT backbone and its diffusion process, shared by the image and audio diffusion configs.

A modality subclasses it as a dataclass with its FAMILIES (e.g. ("image_diffusion",)) and its own fields.
Every field is checked on construction (see megatransformer_utils.YamlConfig).
"""

import dataclasses
from typing import ClassVar, Optional

from megatransformer_utils import YamlConfig
from model.diffusion.objectives import OBJECTIVES
from model.diffusion.samplers import SAMPLERS, SAMPLERS_FOR
from model.diffusion.schedules import SCHEDULES


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass
class DiffusionConfig(YamlConfig):
    """Architecture of a DiT over latents (B, latent_channels, H, W) plus how it is trained and sampled."""

    CHOICES: ClassVar[dict] = {"objective": OBJECTIVES, "schedule": SCHEDULES, "sampler": SAMPLERS}
    DERIVED: ClassVar[dict] = {"patch_height": ("patch_size",)}

    # backbone
    latent_channels: int = 4
    patch_size: int = 2  # patch width (and height unless patch_height is set)
    patch_height: Optional[int] = None  # default patch_size; 1 lets 1-D latents (B, C, T) in
    hidden_size: int = 384
    depth: int = 12
    n_heads: int = 6
    mlp_ratio: float = 4.0
    text_embed_dim: int = 768  # the text encoder's width, D_text

    # diffusion process
    objective: str = "v_prediction"
    schedule: str = "linear"  # VP objectives only; flow matching has its own (sigma = t)
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    min_snr_gamma: Optional[float] = 5.0  # null: unweighted loss
    cfg_dropout: float = 0.1  # probability of training a row without its text

    # sampling defaults
    sampler: str = "ddim"
    sampling_steps: int = 50
    guidance_scale: float = 4.0
    flow_shift: float = 1.0  # flow matching: >1 spends more Euler steps at high noise (SD3 uses 3)

    # training
    ema_decay: float = 0.9999

    def resolve_derived(self) -> None:
        if self.patch_height is None:
            self.patch_height = self.patch_size

    def validate(self) -> None:
        for key in ("latent_channels", "patch_size", "patch_height", "hidden_size", "depth", "n_heads",
                    "text_embed_dim", "num_train_timesteps", "sampling_steps"):
            value = getattr(self, key)
            _require(value >= 1, f"config key '{key}' must be a positive integer, got {value}")
        _require(self.hidden_size % self.n_heads == 0,
                 f"hidden_size={self.hidden_size} must be divisible by n_heads={self.n_heads}")
        _require(self.hidden_size % 4 == 0,
                 f"hidden_size={self.hidden_size} must be divisible by 4 (2D sin-cos position embedding)")
        _require(self.mlp_ratio > 0, f"config key 'mlp_ratio' must be positive, got {self.mlp_ratio}")
        _require(0 < self.beta_start <= self.beta_end < 1,
                 f"need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, beta_end={self.beta_end}")
        _require(self.min_snr_gamma is None or self.min_snr_gamma > 0,
                 f"config key 'min_snr_gamma' must be positive or null (no weighting), got {self.min_snr_gamma}")
        _require(0.0 <= self.cfg_dropout < 1.0, f"config key 'cfg_dropout' must be in [0, 1), got {self.cfg_dropout}")
        _require(self.sampler in SAMPLERS_FOR[self.objective],
                 f"sampler '{self.sampler}' does not fit objective '{self.objective}': "
                 f"use {' or '.join(SAMPLERS_FOR[self.objective])}")
        _require(self.sampling_steps <= self.num_train_timesteps,
                 f"sampling_steps={self.sampling_steps} must be at most num_train_timesteps={self.num_train_timesteps}")
        _require(self.guidance_scale >= 0,
                 f"config key 'guidance_scale' must not be negative, got {self.guidance_scale}")
        _require(self.flow_shift > 0, f"config key 'flow_shift' must be positive, got {self.flow_shift}")
        _require(0.0 <= self.ema_decay < 1.0, f"config key 'ema_decay' must be in [0, 1), got {self.ema_decay}")
