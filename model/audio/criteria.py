"""Vocoder losses, all computed in float32 whatever the inputs' dtype.

Reconstruction: multi-resolution STFT (spectral convergence + log magnitude, Yamamoto et al. 2020),
log-mel L1 (HiFi-GAN), phase losses with anti-wrapping (APNet, Ai & Ling 2023; FreeV): instantaneous phase,
group delay (phase difference across frequency) and instantaneous angular frequency (across time).
Adversarial: least-squares (LSGAN, as in HiFi-GAN) and hinge (as in Vocos / EnCodec) losses, each averaged
over the sub-discriminators, and L1 feature matching.

Shapes: waveforms (B, S); phases (B, F, T); logits a list with one tensor per sub-discriminator (any shape);
features a list (per sub-discriminator) of lists (per layer) of tensors.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.audio.features import AudioFeatureConfig, log_mel, stft

TWO_PI = 2 * math.pi


class MultiResolutionSTFTLoss(nn.Module):
    """Spectral convergence ‖|Y| - |Ŷ|‖_F / ‖|Y|‖_F and mean |log |Y| - log |Ŷ||, each averaged over the
    resolutions. resolutions: [[n_fft, hop_length, win_length], ...].

    forward(predicted (B, S), target (B, S)) → (spectral_convergence, log_magnitude), scalars.
    """

    def __init__(self, resolutions: list):
        super().__init__()
        if not resolutions:
            raise ValueError("MultiResolutionSTFTLoss needs at least one [n_fft, hop_length, win_length]")
        self.resolutions = [AudioFeatureConfig(n_fft=n_fft, hop_length=hop, win_length=win)
                            for n_fft, hop, win in resolutions]

    def forward(self, predicted: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_same_shape(predicted, target, "MultiResolutionSTFTLoss")
        convergence, log_magnitude = 0.0, 0.0
        for cfg in self.resolutions:
            predicted_magnitude = _magnitude(stft(predicted, cfg))
            target_magnitude = _magnitude(stft(target, cfg))
            convergence = convergence + (torch.linalg.vector_norm(target_magnitude - predicted_magnitude)
                                         / torch.linalg.vector_norm(target_magnitude))
            log_magnitude = log_magnitude + F.l1_loss(torch.log(predicted_magnitude), torch.log(target_magnitude))
        return convergence / len(self.resolutions), log_magnitude / len(self.resolutions)


def _magnitude(spec: torch.Tensor) -> torch.Tensor:
    """|spec| floored at sqrt(1e-7) so the log and the gradient stay finite in silence."""
    return torch.sqrt(torch.clamp(spec.real.square() + spec.imag.square(), min=1e-7))


def mel_l1_loss(predicted: torch.Tensor, target: torch.Tensor, cfg: AudioFeatureConfig) -> torch.Tensor:
    """Mean |log_mel(predicted) - log_mel(target)|; waveforms (B, S)."""
    _check_same_shape(predicted, target, "mel_l1_loss")
    return F.l1_loss(log_mel(predicted, cfg), log_mel(target, cfg))


def anti_wrap(x: torch.Tensor) -> torch.Tensor:
    """|x - 2π·round(x / 2π)|: the distance of an angle difference to the nearest multiple of 2π, in [0, π]."""
    return torch.abs(x - TWO_PI * torch.round(x / TWO_PI))


def instantaneous_phase_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean anti-wrapped phase error; phases (B, F, T)."""
    _check_same_shape(predicted, target, "instantaneous_phase_loss")
    return anti_wrap(predicted.float() - target.float()).mean()


def group_delay_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean anti-wrapped error of the phase differences between neighbouring bins; phases (B, F, T)."""
    _check_same_shape(predicted, target, "group_delay_loss")
    return anti_wrap(torch.diff(predicted.float(), dim=-2) - torch.diff(target.float(), dim=-2)).mean()


def instantaneous_frequency_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean anti-wrapped error of the phase differences between neighbouring frames; phases (B, F, T)."""
    _check_same_shape(predicted, target, "instantaneous_frequency_loss")
    return anti_wrap(torch.diff(predicted.float(), dim=-1) - torch.diff(target.float(), dim=-1)).mean()


def feature_matching_loss(real_features: list, fake_features: list) -> torch.Tensor:
    """Σ over layers of mean |real - fake|, averaged over sub-discriminators. The real side is the target
    (detached): only the generator learns from this loss."""
    if len(real_features) != len(fake_features) or not real_features:
        raise ValueError(f"feature_matching_loss needs the same non-zero number of sub-discriminators on both sides, "
                         f"got {len(real_features)} real and {len(fake_features)} fake")
    total = 0.0
    for real_layers, fake_layers in zip(real_features, fake_features):
        for real, fake in zip(real_layers, fake_layers, strict=True):
            total = total + F.l1_loss(fake.float(), real.detach().float())
    return total / len(real_features)


def generator_adversarial_loss(fake_logits: list, kind: str) -> torch.Tensor:
    """lsgan: mean (1 - D(G))²; hinge: mean max(0, 1 - D(G)); averaged over sub-discriminators."""
    _check_kind(kind)
    _check_logits(fake_logits)
    if kind == "lsgan":
        terms = [torch.mean((1 - logits.float()) ** 2) for logits in fake_logits]
    else:
        terms = [torch.mean(F.relu(1 - logits.float())) for logits in fake_logits]
    return sum(terms) / len(terms)


def discriminator_adversarial_loss(real_logits: list, fake_logits: list, kind: str) -> torch.Tensor:
    """lsgan: mean (1 - D(x))² + mean D(G)²; hinge: mean max(0, 1 - D(x)) + mean max(0, 1 + D(G));
    averaged over sub-discriminators."""
    _check_kind(kind)
    _check_logits(real_logits)
    _check_logits(fake_logits)
    if len(real_logits) != len(fake_logits):
        raise ValueError(f"got logits of {len(real_logits)} sub-discriminators for real audio "
                         f"and {len(fake_logits)} for generated audio")
    terms = []
    for real, fake in zip(real_logits, fake_logits):
        real, fake = real.float(), fake.float()
        if kind == "lsgan":
            terms.append(torch.mean((1 - real) ** 2) + torch.mean(fake ** 2))
        else:
            terms.append(torch.mean(F.relu(1 - real)) + torch.mean(F.relu(1 + fake)))
    return sum(terms) / len(terms)


def _check_kind(kind: str) -> None:
    if kind not in ("lsgan", "hinge"):
        raise ValueError(f"adversarial loss kind must be 'lsgan' or 'hinge', got {kind!r}")


def _check_logits(logits: list) -> None:
    if not isinstance(logits, (list, tuple)) or not logits:
        raise ValueError("adversarial losses take a non-empty list of logits, one tensor per sub-discriminator")


def _check_same_shape(predicted: torch.Tensor, target: torch.Tensor, name: str) -> None:
    if predicted.shape != target.shape:
        raise ValueError(f"{name}: predicted {tuple(predicted.shape)} and target {tuple(target.shape)} "
                         "must have the same shape")
