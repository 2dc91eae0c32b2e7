"""Image diffusion: a DiT (model/diffusion/dit.py) denoising image-VAE latents, conditioned on text embeddings.

    config = ImageDiffusionConfig.from_name("small_dit")      # configs/image_diffusion/small_dit.yaml
    model = build_image_diffusion(config)                     # model.config is config
    loss, logs = diffusion_loss(model, latents, text_emb, text_mask)
    latents = sample(model, (B, config.latent_channels, config.latent_height, config.latent_width),
                     text_emb, text_mask)

Named configs (`model_config_lookup`): `tiny_dit` (tests), `small_dit` (DiT-S/2 widths: hidden 384, depth 12,
6 heads, patch 2) and `medium_dit` (DiT-B/2: 768, 12, 12), each with cross-attention to text, so a little
larger than the class-conditional DiTs of the same names.
"""

import dataclasses
from typing import ClassVar

from model.diffusion.config import DiffusionConfig
from model.diffusion.dit import DiT


@dataclasses.dataclass
class ImageDiffusionConfig(DiffusionConfig):
    """A DiffusionConfig plus the latent grid sampled by default (the VAE's latent size of the training images)."""

    FAMILIES: ClassVar[tuple] = ("image_diffusion",)

    latent_height: int = 32
    latent_width: int = 32

    def validate(self) -> None:
        super().validate()
        if self.latent_height % self.patch_height or self.latent_width % self.patch_size:
            raise ValueError(f"latent_height={self.latent_height} and latent_width={self.latent_width} must be "
                             f"divisible by the patch {self.patch_height}x{self.patch_size}")


model_config_lookup = ImageDiffusionConfig.registry()  # name → config, parsed when looked up


def build_image_diffusion(config: ImageDiffusionConfig) -> DiT:
    """A freshly initialised DiT for `config` (zero output until trained, see dit.py)."""
    return DiT(config)
