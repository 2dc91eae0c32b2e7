"""Loading the audio generation runs: the audio VAE of pretrain_audio_vae.py and the DiT of
pretrain_audio_diffusion.py (both through model/pretrained.py's family table).

    vae = load_audio_vae_checkpoint("runs/audio_vae_run/checkpoint-XXX")                  # XXX: a saved step
    dit, meta = load_audio_diffusion_checkpoint("runs/diffusion_run/checkpoint-XXX")       # EMA weights + run facts
"""

import torch

from model.audio.diffusion import AudioDiT
from model.audio.vae import AudioVAE
from model.pretrained import load_diffusion_checkpoint, load_pretrained


def load_audio_vae_checkpoint(directory, device: torch.device | str = "cpu") -> AudioVAE:
    """The eval-mode, frozen float32 VAE of a pretrain_audio_vae.py checkpoint (config.yaml, model.safetensors)."""
    return load_pretrained(directory, device, family="audio_vae").requires_grad_(False)


def load_audio_diffusion_checkpoint(checkpoint, use_ema: bool = True,
                                    device: torch.device | str = "cpu") -> tuple[AudioDiT, dict]:
    """The eval-mode DiT of a pretrain_audio_diffusion.py checkpoint (its EMA weights, or the trained ones) and the
    checkpoint's diffusion_meta.json (representation, normalisation, VAE, encoders, frames per text token)."""
    return load_diffusion_checkpoint(checkpoint, "audio_diffusion", use_ema, device)
