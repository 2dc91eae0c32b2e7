"""Samplers: DDPM and DDIM for the VP objectives, Euler for flow matching, and `sample`, the full loop.

    latents = sample(model, (B, C, H, W), text_emb, text_mask, guidance_scale=4.0, steps=50, generator=g)

Each step is written from its paper and matches diffusers' DDPMScheduler (variance "fixed_small"),
DDIMScheduler (set_alpha_to_one) and FlowMatchEulerDiscreteScheduler given the same grid (tested).
The loop runs in float32 whatever the model's dtype; the model gets its inputs cast by its own forward.
"""

import torch

from model.diffusion.guidance import guided_prediction
from model.diffusion.objectives import check_objective, per_sample, predict_x0_and_noise
from model.diffusion.schedules import flow_sigmas, noise_schedule, sampling_timesteps

SAMPLERS = ("ddpm", "ddim", "euler")
SAMPLERS_FOR = {"epsilon": ("ddpm", "ddim"), "v_prediction": ("ddpm", "ddim"), "flow_matching": ("euler",)}


def check_sampler(sampler: str, objective: str) -> None:
    check_objective(objective)
    if sampler not in SAMPLERS_FOR[objective]:
        raise ValueError(f"sampler '{sampler}' does not fit objective '{objective}': "
                         f"use {' or '.join(SAMPLERS_FOR[objective])}")


def ddpm_step(x0: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor,
              noise: torch.Tensor | None) -> torch.Tensor:
    """Ancestral step from the posterior q(x_prev | x_t, x0) (Ho et al. 2020, eqs. 6-7), variance beta-tilde.

    x0, x_t: (B, ...); alpha_bar, alpha_bar_prev: (B,) at t and at the next (less noisy) visited step;
    noise: (B, ...) or None at the last step. Skipping steps uses beta_t = 1 - alpha_bar / alpha_bar_prev.
    """
    ab, ab_prev = per_sample(alpha_bar, x_t), per_sample(alpha_bar_prev, x_t)
    alpha_t = ab / ab_prev
    mean = (ab_prev.sqrt() * (1 - alpha_t) * x0 + alpha_t.sqrt() * (1 - ab_prev) * x_t) / (1 - ab)
    if noise is None:
        return mean
    variance = (1 - ab_prev) / (1 - ab) * (1 - alpha_t)
    return mean + variance.clamp(min=1e-20).sqrt() * noise


def ddim_step(x0: torch.Tensor, predicted_noise: torch.Tensor, alpha_bar: torch.Tensor,
              alpha_bar_prev: torch.Tensor, eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - s^2) eps + s z.

    s = eta * sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)); eta 0 is deterministic, eta 1 is DDPM.
    noise (B, ...) is needed only when eta > 0.
    """
    ab, ab_prev = per_sample(alpha_bar, x0), per_sample(alpha_bar_prev, x0)
    std = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
    x_prev = ab_prev.sqrt() * x0 + (1 - ab_prev - std ** 2).clamp(min=0).sqrt() * predicted_noise
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x_prev = x_prev + std * noise
    return x_prev


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the flow ODE dx/dsigma = velocity from sigma to sigma_next: (B, ...)."""
    return x + (sigma_next - sigma) * velocity


@torch.no_grad()
def sample(model, shape: tuple, text_emb: torch.Tensor, text_mask: torch.Tensor,
           uncond_emb: torch.Tensor | None = None, uncond_mask: torch.Tensor | None = None,
           guidance_scale: float | None = None, steps: int | None = None, sampler: str | None = None,
           generator: torch.Generator | None = None, eta: float = 0.0) -> torch.Tensor:
    """Generate latents of `shape` (B, ...) float32 from pure noise, guided by text_emb (B, L, D_text).

    text_mask: (B, L) bool. uncond_emb/uncond_mask: explicit unconditional text (see guidance.py), or None
    for the model's learned null condition. guidance_scale, steps and sampler default to model.config's
    (guidance_scale, sampling_steps, sampler). generator: on text_emb's device; the same seed gives the
    same latents. eta: DDIM's stochasticity (0 = deterministic).
    """
    config = model.config
    guidance_scale = config.guidance_scale if guidance_scale is None else guidance_scale
    steps = config.sampling_steps if steps is None else steps
    sampler = config.sampler if sampler is None else sampler
    check_sampler(sampler, config.objective)
    if shape[0] != text_emb.shape[0]:
        raise ValueError(f"shape {tuple(shape)} asks for {shape[0]} samples but text_emb holds {text_emb.shape[0]}")
    device = text_emb.device

    def randn() -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device)

    def predict(x: torch.Tensor, model_timestep: float) -> torch.Tensor:
        timesteps = torch.full((shape[0],), float(model_timestep), device=device)
        return guided_prediction(model, x, timesteps, text_emb, text_mask, guidance_scale, uncond_emb, uncond_mask)

    x = randn()
    T = config.num_train_timesteps
    if sampler == "euler":
        sigmas = flow_sigmas(steps, config.flow_shift).tolist()
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            x = euler_step(x, predict(x, sigma * T), sigma, sigma_next)
        return x

    schedule = noise_schedule(config.schedule, T, config.beta_start, config.beta_end)
    timesteps = sampling_timesteps(T, steps)
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
        alpha_bar, alpha_bar_prev = schedule.alpha_bar(torch.tensor([t, t_prev], device=device)).unbind()
        alpha_bar, alpha_bar_prev = alpha_bar.expand(shape[0]), alpha_bar_prev.expand(shape[0])
        output = predict(x, t)
        x0, predicted_noise = predict_x0_and_noise(config.objective, output, x, alpha_bar.sqrt(),
                                                   (1 - alpha_bar).sqrt())
        if sampler == "ddpm":
            x = ddpm_step(x0, x, alpha_bar, alpha_bar_prev, randn() if t_prev >= 0 else None)
        else:
            x = ddim_step(x0, predicted_noise, alpha_bar, alpha_bar_prev, eta, randn() if eta > 0 else None)
    return x
