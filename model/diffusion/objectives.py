"""Training objectives: what the network predicts from noisy latents, and min-SNR loss weights.

Every objective noises clean latents x0 as x_t = alpha * x0 + sigma * noise with per-sample (B,) coefficients:

    epsilon        VP schedule (alpha^2 + sigma^2 = 1), integer t; the network predicts the noise
    v_prediction   VP schedule, integer t; it predicts v = alpha * noise - sigma * x0 (Salimans & Ho 2022)
    flow_matching  rectified flow, alpha = 1 - t, sigma = t with t in [0, 1]; it predicts the velocity
                   d x_t / dt = noise - x0 (Liu et al. 2022, Esser et al. 2024)

The network is conditioned on `model_timesteps` (B,) float on the same 0..T scale for all three: the
integer step for VP schedules and t * T for flow matching. Latents are any (B, ...) shape: (B, C, H, W)
for images, (B, C, T) or (B, C, H, W) for audio; coefficients broadcast over everything after B.
"""

import torch

from model.diffusion.schedules import NoiseSchedule

OBJECTIVES = ("epsilon", "v_prediction", "flow_matching")


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown diffusion objective '{objective}': choose one of {', '.join(OBJECTIVES)}")


def per_sample(coefficient: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """coefficient: (B,) → (B, 1, ..., 1), broadcastable against `like` (B, ...)."""
    return coefficient.view(-1, *([1] * (like.ndim - 1)))


def sample_noise_levels(objective: str, schedule: NoiseSchedule, batch_size: int, device: torch.device,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uniform training noise levels → (alpha, sigma, model_timesteps), each (B,) float32 on `device`."""
    check_objective(objective)
    T = schedule.num_timesteps
    if objective == "flow_matching":
        t = torch.rand(batch_size, generator=generator, device=device)
        return 1 - t, t, t * T
    timesteps = torch.randint(0, T, (batch_size,), generator=generator, device=device)
    alpha, sigma = schedule.coefficients(timesteps)
    return alpha, sigma, timesteps.float()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0, noise: (B, ...); alpha, sigma: (B,) → x_t = alpha * x0 + sigma * noise: (B, ...)."""
    return per_sample(alpha, x0) * x0 + per_sample(sigma, x0) * noise


def training_target(objective: str, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor,
                    sigma: torch.Tensor) -> torch.Tensor:
    """What the network should output for x_t = add_noise(x0, noise, alpha, sigma): (B, ...)."""
    check_objective(objective)
    if objective == "epsilon":
        return noise
    if objective == "v_prediction":
        return per_sample(alpha, x0) * noise - per_sample(sigma, x0) * x0
    return noise - x0


def predict_x0_and_noise(objective: str, output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor,
                         sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latents and the noise (each (B, ...)) implied by a network output for x_t (alpha > 0)."""
    check_objective(objective)
    a, s = per_sample(alpha, x_t), per_sample(sigma, x_t)
    if objective == "epsilon":
        return (x_t - s * output) / a, output
    if objective == "v_prediction":  # uses alpha^2 + sigma^2 = 1
        return a * x_t - s * output, s * x_t + a * output
    return x_t - s * output, x_t + a * output


def min_snr_weight(objective: str, alpha: torch.Tensor, sigma: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): (B,) float32.

    The paper weights the error of the predicted x0 by min(SNR, gamma), SNR = alpha^2 / sigma^2. Its
    squared error is the objective's squared error times (sigma / alpha)^2 for epsilon, sigma^2 for
    v_prediction (with alpha^2 + sigma^2 = 1) and t^2 = sigma^2 for flow matching (x0 = x_t - t * v),
    so the weights on each objective's own loss are

        epsilon: min(SNR, gamma) / SNR    v_prediction: min(SNR, gamma) / (SNR + 1)    flow: min(SNR, gamma) * t^2

    written below without dividing by sigma, which is 0 at t = 0 for flow matching.
    """
    check_objective(objective)
    a2, s2 = alpha.float().square(), sigma.float().square()
    if objective == "epsilon":
        return torch.clamp(gamma * s2 / a2, max=1.0)
    if objective == "v_prediction":
        return torch.minimum(a2, gamma * s2) / (a2 + s2)
    return torch.minimum(a2, gamma * s2)
