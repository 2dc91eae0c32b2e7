"""The diffusion training loss a pretrain script calls once per micro-batch.

    loss, logs = diffusion_loss(model, latents, text_emb, text_mask)
"""

import torch

from model.diffusion.guidance import condition_dropout_mask
from model.diffusion.objectives import (add_noise, min_snr_weight, sample_noise_levels, training_target)
from model.diffusion.schedules import noise_schedule


def diffusion_loss(model, latents: torch.Tensor, text_emb: torch.Tensor, text_mask: torch.Tensor,
                   generator: torch.Generator | None = None,
                   cfg_dropout: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Noise the clean latents at random levels and regress the model's output on its objective's target.

    latents: (B, ...) clean latents, e.g. (B, C, H, W); text_emb: (B, L, D_text); text_mask: (B, L) bool.
    model: a denoiser (see guidance.py) with `.config` (a DiffusionConfig: objective, schedule,
    min_snr_gamma, cfg_dropout). Each row gets a uniform noise level, its condition is dropped with
    probability cfg_dropout (default config.cfg_dropout; pass 0 for evaluation) and its mean squared error,
    computed in float32, is weighted by min-SNR-gamma when config.min_snr_gamma is set.
    generator: on latents' device, for reproducible noise, levels and dropout; None uses the global RNG.
    Returns (loss: scalar float32, logs: {"mse": unweighted, "loss_weight": mean weight, "cfg_dropped":
    fraction of rows without condition}, all detached scalars).
    """
    config = model.config
    if latents.ndim < 2 or latents.shape[0] != text_emb.shape[0]:
        raise ValueError(f"latents (B, ...) and text_emb (B, L, D_text) must share B, got {tuple(latents.shape)} "
                         f"and {tuple(text_emb.shape)}")
    batch, device = latents.shape[0], latents.device
    x0 = latents.float()
    schedule = noise_schedule(config.schedule, config.num_train_timesteps, config.beta_start, config.beta_end)
    alpha, sigma, model_timesteps = sample_noise_levels(config.objective, schedule, batch, device, generator)
    noise = torch.randn(x0.shape, generator=generator, device=device)
    drop = condition_dropout_mask(batch, config.cfg_dropout if cfg_dropout is None else cfg_dropout, device, generator)

    output = model(add_noise(x0, noise, alpha, sigma), model_timesteps, text_emb, text_mask, drop_condition=drop)
    target = training_target(config.objective, x0, noise, alpha, sigma)
    mse = (output.float() - target).square().flatten(1).mean(1)
    if config.min_snr_gamma is None:
        weight = torch.ones_like(mse)
    else:
        weight = min_snr_weight(config.objective, alpha, sigma, config.min_snr_gamma)
    loss = (weight * mse).mean()
    logs = {"mse": mse.mean().detach(), "loss_weight": weight.mean().detach(), "cfg_dropped": drop.float().mean()}
    return loss, logs
