"""The PatchGAN discriminator of pix2pix (`NLayerDiscriminator`), as taming-transformers and LDM use it.

    discriminator = build_discriminator(config)     # config.use_discriminator must be true
    logits = discriminator(images)                  # images (B, 3, H, W) -> (B, 1, H / 2**n - 2, W / 2**n - 2)

n = config.disc_layers stride-2 4x4 convolutions (widths disc_channels * 1, 2, 4, 8, 8, ...), a stride-1 4x4
convolution with BatchNorm, and a stride-1 4x4 convolution to one logit per patch; LeakyReLU(0.2) between them.
Weights start as taming's `weights_init`: convolution weights N(0, 0.02), BatchNorm
scales N(1, 0.02) and shifts 0.
"""

import torch
from torch import nn

from model.image.vae import ImageVAEConfig


def build_discriminator(config: ImageVAEConfig) -> "PatchGANDiscriminator":
    """The discriminator the config describes; its `.config` is the config."""
    if not config.use_discriminator:
        raise ValueError(f"config '{config.name}' has use_discriminator: false; set it to true (as the gan_ configs "
                         "do) to train adversarially")
    discriminator = PatchGANDiscriminator(config.image_channels, config.disc_channels, config.disc_layers)
    discriminator.config = config
    return discriminator


class PatchGANDiscriminator(nn.Module):
    """images: (B, in_channels, H, W) -> logits (B, 1, H / 2**n_layers - 2, W / 2**n_layers - 2) (floor division
    at each stride-2 layer); H and W must be at least 3 * 2**n_layers."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"the PatchGAN needs at least one stride-2 layer, got n_layers={n_layers}")
        self.n_layers = n_layers
        layers = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, n_layers + 1):
            previous, width = width, channels * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(previous, width, 4, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_taming_init)

    @property
    def min_image_size(self) -> int:
        return 3 * 2 ** self.n_layers

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or min(images.shape[-2:]) < self.min_image_size:
            raise ValueError(f"the PatchGAN with {self.n_layers} layers needs images (B, C, H, W) with H and W at "
                             f"least {self.min_image_size}, got {tuple(images.shape)}; use fewer disc_layers")
        return self.main(images)


def _taming_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
