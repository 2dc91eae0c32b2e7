"""The image VAE's loss from its config, and the LPIPS perceptual network it can use.

    loss = build_image_vae_loss(config)     # model/vae.VAELoss with the config's weights

LPIPS (Zhang et al. 2018, the `lpips` package) is used only when `perceptual_weight > 0`. It is not among this
project's requirements: install it with `pip install lpips` (it needs torchvision), and make torchvision's
pretrained VGG16 weights available in the torch hub cache (`torch.hub.get_dir()`), which lpips downloads on first
use. Without either, asking for it stops with a ValueError that says so; `perceptual_weight: 0` trains without it.
"""

import logging

import torch
from torch import nn

from model.image.vae import ImageVAEConfig
from model.vae import VAELoss

logger = logging.getLogger(__name__)


def build_image_vae_loss(config: ImageVAEConfig) -> VAELoss:
    """VAELoss with the config's reconstruction type and weights; loads LPIPS when perceptual_weight > 0."""
    return VAELoss(reconstruction=config.reconstruction_loss, kl_weight=config.kl_weight,
                   perceptual=load_lpips() if config.perceptual_weight > 0 else None,
                   perceptual_weight=config.perceptual_weight, disc_weight=config.disc_weight,
                   disc_start_step=config.disc_start_step, adaptive_weight_max=config.adaptive_weight_max)


def load_lpips(net: str = "vgg") -> nn.Module:
    """The frozen, eval-mode LPIPS network: (x, y) images (B, 3, H, W) in [-1, 1] -> distances (B, 1, 1, 1)."""
    try:
        import lpips
    except ImportError as error:
        raise ValueError("perceptual_weight > 0 needs the `lpips` package, which is not installed: install it with "
                         "`pip install lpips` (it needs torchvision), or set perceptual_weight: 0") from error
    try:
        network = lpips.LPIPS(net=net, verbose=False)
    except Exception as error:
        raise ValueError(f"could not load the LPIPS {net} network ({type(error).__name__}: {error}); lpips needs "
                         f"torchvision's pretrained {net} weights in the torch hub cache ({torch.hub.get_dir()}): "
                         "fetch them once where there is internet access, or set perceptual_weight: 0") from error
    logger.info("loaded LPIPS (%s) for the perceptual loss", net)
    return network.eval().requires_grad_(False)
