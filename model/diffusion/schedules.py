"""Noise schedules: the discrete variance-preserving schedules of DDPM and the sampling grids of every sampler.

A variance-preserving (VP) schedule noises clean latents x0 at integer step t in [0, T) as

    x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise,   alpha_bar_t = prod_{s <= t} (1 - beta_s)

with betas from `linear` (DDPM, DiT), `scaled_linear` (Stable Diffusion's latent schedule) or `cosine`
(Nichol & Dhariwal 2021; diffusers calls it `squaredcos_cap_v2`). Rectified flow needs no table: its
noise level is sigma = t in [0, 1] (see objectives.py), and `flow_sigmas` gives its sampling grid.
"""

import math
from functools import lru_cache

import torch

SCHEDULES = ("linear", "scaled_linear", "cosine")


def make_betas(schedule: str, num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """The betas (T,) float64 of a named schedule (beta_start/beta_end are unused by `cosine`)."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    if schedule == "cosine":
        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = [(i / num_timesteps, (i + 1) / num_timesteps) for i in range(num_timesteps)]
        return torch.tensor([min(1 - alpha_bar(b) / alpha_bar(a), 0.999) for a, b in steps], dtype=torch.float64)
    raise ValueError(f"unknown noise schedule '{schedule}': choose one of {', '.join(SCHEDULES)}")


class NoiseSchedule:
    """A discrete VP schedule. alphas_cumprod: (T,) float64 on the CPU; `alpha_bar` reads it on any device."""

    def __init__(self, schedule: str = "linear", num_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02):
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}")
        self.name = schedule
        self.num_timesteps = num_timesteps
        self.betas = make_betas(schedule, num_timesteps, beta_start, beta_end)
        if not bool(((self.betas > 0) & (self.betas < 1)).all()):
            raise ValueError(f"schedule '{schedule}' with beta_start={beta_start}, beta_end={beta_end} gives betas "
                             "outside (0, 1): pick 0 < beta_start <= beta_end < 1")
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)
        # alpha_bar at index -1 (the step after the last, "no noise") is 1, as diffusers' set_alpha_to_one
        self._padded = torch.cat((self.alphas_cumprod, torch.ones(1, dtype=torch.float64)))
        self._tables: dict[torch.device, torch.Tensor] = {}

    def alpha_bar(self, timesteps: torch.Tensor) -> torch.Tensor:
        """timesteps: (B,) integers in [-1, T) on any device → alpha_bar (B,) float32 there; -1 gives 1."""
        table = self._tables.get(timesteps.device)
        if table is None:
            table = self._tables[timesteps.device] = self._padded.to(device=timesteps.device, dtype=torch.float32)
        return table[timesteps.long()]  # index -1 reads the appended 1

    def coefficients(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timesteps: (B,) → (alpha, sigma), each (B,) float32, with x_t = alpha * x0 + sigma * noise."""
        alpha_bar = self.alpha_bar(timesteps)
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


@lru_cache(maxsize=16)
def noise_schedule(schedule: str, num_timesteps: int, beta_start: float, beta_end: float) -> NoiseSchedule:
    """A shared NoiseSchedule per set of arguments (its per-device tables are built once)."""
    return NoiseSchedule(schedule, num_timesteps, beta_start, beta_end)


def sampling_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """The `steps` integer timesteps a DDPM/DDIM sampler visits, from noisiest to cleanest.

    "trailing" spacing (Lin et al. 2024, diffusers' timestep_spacing="trailing"): it starts at T - 1, the
    step training saw the most noise at, and spreads the rest evenly down to about T / steps - 1.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"sampling steps must be between 1 and num_train_timesteps={num_train_timesteps}, got {steps}")
    stride = num_train_timesteps / steps
    return [round(num_train_timesteps - i * stride) - 1 for i in range(steps)]


def flow_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """The rectified-flow noise levels (steps + 1,) float32 an Euler sampler visits, from 1 down to 0.

    Even in sigma, then shifted as in SD3 (sigma' = shift * sigma / (1 + (shift - 1) * sigma)): a shift
    above 1 spends more steps at high noise, which helps larger latents.
    """
    if steps < 1:
        raise ValueError(f"sampling steps must be at least 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"flow_shift must be positive, got {shift}")
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * sigmas / (1 + (shift - 1) * sigmas)).float()
