"""Diffusion machinery shared by image and audio diffusion: schedules, objectives, samplers, guidance, EMA, DiT.

    from model.diffusion import DiT, diffusion_loss, sample, EMA
    loss, logs = diffusion_loss(model, latents, text_emb, text_mask)          # training, any (B, ...) latents
    latents = sample(model, (B, C, H, W), text_emb, text_mask, guidance_scale=4.0)
"""

from model.diffusion.config import DiffusionConfig
from model.diffusion.dit import DiT
from model.diffusion.ema import EMA
from model.diffusion.loss import diffusion_loss
from model.diffusion.samplers import sample

__all__ = ["DiT", "DiffusionConfig", "EMA", "diffusion_loss", "sample"]
