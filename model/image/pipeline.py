"""Text-to-image with a trained DiT: its checkpoint (EMA weights and the run's diffusion_meta.json), the image VAE
that decodes its latents, a grid of samples, and images of prompts as uint8 pixels.

    model, meta = load_diffusion_checkpoint("runs/RUN/checkpoint-5000", device="cuda")    # EMA weights
    vae, _ = load_vae_checkpoint(meta["vae_checkpoint"], device="cuda")
    grid = sample_grid(model, vae, text_emb, text_mask, meta["latent_scale_factor"], [1.0, 4.0], steps=50)
    for prompt, pixels in text_to_images(model, vae, encoder, ["a red circle"], 4, meta["latent_scale_factor"]):
        ...                                         # pixels: (4, H, W, 3) uint8; files named by slug(prompt)
    latents = encode_pixels(vae, pixels) * scale    # uint8 (B, H, W, 3) -> posterior means; decode_pixels: back

A checkpoint of pretrain_image_diffusion.py holds config.yaml, model.safetensors, ema.safetensors and
diffusion_meta.json: the VAE checkpoint, latent scale factor and text encoder the run used.
"""

import re
from pathlib import Path

import numpy as np
import torch

from model.diffusion import sample
from model.diffusion.dit import DiT
from model.image.vae import ImageVAE, ImageVAEConfig
from model.pretrained import load_pretrained
from model.pretrained import load_diffusion_checkpoint as load_diffusion_run

SAMPLE_SEED = 0
MAX_SLUG_LENGTH = 60


def load_vae_checkpoint(directory, fallback_config: str | None = None,
                        device: torch.device | str = "cpu") -> tuple[ImageVAE, list[str]]:
    """The eval-mode float32 VAE of a checkpoint directory (model.safetensors, config.yaml) and the differences
    between its recorded config.yaml and `fallback_config` (a name in configs/image_vae/ or a YAML path), which is
    used only where the checkpoint records none: ["key: checkpoint X, --vae_config Y", ...], empty if they agree."""
    directory = Path(directory)
    if not (directory / "model.safetensors").is_file():
        what = "does not exist" if not directory.exists() else "has no model.safetensors"
        raise FileNotFoundError(f"VAE checkpoint {directory} {what}: pass --vae_checkpoint a checkpoint directory "
                                "written by pretrain_image_vae.py (runs/RUN/checkpoint-STEP)")
    given = ImageVAEConfig.from_name(fallback_config) if fallback_config else None
    mismatch, config = [], None
    if (directory / "config.yaml").is_file():
        if given is not None:
            recorded, named = ImageVAEConfig.from_yaml(directory / "config.yaml").to_dict(), given.to_dict()
            mismatch = [f"{key}: checkpoint {recorded[key]!r}, --vae_config {named[key]!r}" for key in recorded
                        if key != "name" and recorded[key] != named[key]]
    elif given is not None:
        config = given
    else:
        raise ValueError(f"VAE checkpoint {directory} has no config.yaml: name its architecture with --vae_config "
                         "(a config in configs/image_vae/ or a YAML path)")
    vae = load_pretrained(directory, device, family="image_vae", config=config)
    return vae.requires_grad_(False), mismatch


def load_diffusion_checkpoint(checkpoint, use_ema: bool = True,
                              device: torch.device | str = "cpu") -> tuple[DiT, dict]:
    """The eval-mode DiT of a pretrain_image_diffusion.py checkpoint (its EMA weights, or the trained ones) and
    the checkpoint's diffusion_meta.json (VAE checkpoint, latent scale factor, text encoder)."""
    return load_diffusion_run(checkpoint, "image_diffusion", use_ema, device)


def sample_grid(model, vae: ImageVAE, text_emb: torch.Tensor, text_mask: torch.Tensor, scale_factor: float,
                guidance_scales, steps: int | None, seed: int = SAMPLE_SEED) -> torch.Tensor:
    """Decoded samples for P prompts (text_emb: (P, L, D), text_mask: (P, L)) at each guidance scale, from the same
    noise: (3, G * H, P * W) float32 in [0, 1], one row per guidance scale."""
    config, device = model.config, text_emb.device
    shape = (text_emb.shape[0], config.latent_channels, config.latent_height, config.latent_width)
    rows = []
    for guidance_scale in guidance_scales:
        generator = torch.Generator(device=device).manual_seed(seed)
        latents = sample(model, shape, text_emb, text_mask, guidance_scale=guidance_scale, steps=steps,
                         generator=generator)
        images = vae.decode(latents / scale_factor).float().clamp(-1, 1)
        rows.append(torch.cat(list(images), dim=-1))
    return (torch.cat(rows, dim=-2) + 1) / 2


def slug(prompt: str) -> str:
    """'A red circle, big!' -> 'a-red-circle-big' (at most MAX_SLUG_LENGTH characters): the file name stem of a
    prompt's generated images."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:MAX_SLUG_LENGTH].rstrip("-") or "prompt"


def encode_pixels(vae: ImageVAE, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 RGB images (B, H, W, 3) -> the VAE's posterior means (B, C, h, w) (unscaled), on the VAE's device."""
    device = next(vae.parameters()).device
    return vae.encode(pixels.permute(0, 3, 1, 2).to(device).float() / 127.5 - 1.0).mean


def decode_pixels(vae: ImageVAE, latents: torch.Tensor) -> np.ndarray:
    """Latents (B, C, h, w) (unscaled) -> uint8 RGB images (B, H, W, 3) on the CPU."""
    images = (vae.decode(latents).float().clamp(-1, 1) + 1) * 127.5
    return images.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def text_to_images(model: DiT, vae: ImageVAE, encoder, prompts: list[str], num_images: int, scale_factor: float,
                   seed: int = 0, guidance_scale: float | None = None, steps: int | None = None,
                   sampler: str | None = None):
    """Yield (prompt, uint8 images (num_images, H, W, 3)) for each prompt, sampled by the DiT (encoder: its text
    encoder) and decoded by the VAE. Prompt p draws its noise from a generator seeded by seed * 1_000_003 + p, so the
    same seed gives the same images at every guidance scale."""
    config, device = model.config, next(model.parameters()).device
    for index, prompt in enumerate(prompts):
        text_emb, text_mask = encoder.encode([prompt])
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
        latents = sample(model, (num_images, config.latent_channels, config.latent_height, config.latent_width),
                         text_emb.expand(num_images, -1, -1), text_mask.expand(num_images, -1),
                         guidance_scale=guidance_scale, steps=steps, sampler=sampler, generator=generator)
        yield prompt, decode_pixels(vae, latents / scale_factor)
