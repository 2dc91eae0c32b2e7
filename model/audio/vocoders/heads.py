"""Spectral heads: backbone features → log-magnitude and phase of the STFT, per frequency bin.

The magnitude head predicts a log-magnitude with a smooth upper bound (`max_log_magnitude`) so the
exponential cannot blow up; the phase head predicts a pseudo real and imaginary part per bin whose angle
is the phase (the parallel phase estimation of APNet): the phase stays wrapped in (-π, π] without any
discontinuous activation, and the vocoder builds the unit phasor from them without trigonometry. Outputs
are float32 whatever the weights' dtype: they feed exp, the iSTFT and the losses.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def _projection(dim: int, out_features: int, head_dim: Optional[int]) -> nn.Module:
    """Linear(dim, out_features), or with head_dim the bottleneck
    Linear(dim, head_dim) → GELU → Linear(head_dim, out_features)."""
    if head_dim is None:
        return nn.Linear(dim, out_features)
    return nn.Sequential(nn.Linear(dim, head_dim), nn.GELU(), nn.Linear(head_dim, out_features))


class SpectralHead(nn.Module):
    """hidden: (B, T, dim) → log_magnitude, real, imag, each (B, n_bins, T) float32; phase = atan2(imag, real).

    head_dim=None gives full-width linear heads (as in Vocos); an integer gives the light heads, each a
    bottleneck through head_dim features.
    """

    def __init__(self, dim: int, n_bins: int, max_log_magnitude: float, head_dim: Optional[int] = None):
        super().__init__()
        self.max_log_magnitude = max_log_magnitude
        self.magnitude_bins = n_bins
        self.magnitude = _projection(dim, n_bins, head_dim)
        self.phase = _projection(dim, 2 * n_bins, head_dim)

    def zero_magnitude_output(self) -> None:
        """Start the magnitude head at exactly zero output (its last layer zeroed): with a prior, at the prior."""
        last = self.magnitude[-1] if isinstance(self.magnitude, nn.Sequential) else self.magnitude
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, hidden: torch.Tensor, log_magnitude_prior: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log_magnitude_prior: (B, n_bins, T) added to the magnitude head's output (before the bound), or None."""
        raw = self.magnitude(hidden).float().transpose(1, 2)
        if log_magnitude_prior is not None:
            raw = raw + log_magnitude_prior
        # smooth min(raw, bound): ≈ raw well below the bound, never above it, gradient never exactly zero
        log_magnitude = self.max_log_magnitude - F.softplus(self.max_log_magnitude - raw)
        real, imag = self.phase(hidden).float().transpose(1, 2).chunk(2, dim=1)
        return log_magnitude, real, imag


class SplitBandSpectralHead(nn.Module):
    """Separate spectral heads for the bins below `split_bin` and for the bins from it up to n_freqs - 1.

    hidden: (B, T, dim) → log_magnitude, real, imag, each (B, n_freqs, T) float32 (as SpectralHead).
    """

    def __init__(self, dim: int, n_freqs: int, split_bin: int, max_log_magnitude: float,
                 head_dim: Optional[int] = None):
        super().__init__()
        if not 0 < split_bin < n_freqs:
            raise ValueError(f"split_bin={split_bin} must be between 1 and n_freqs - 1 = {n_freqs - 1}")
        self.low = SpectralHead(dim, split_bin, max_log_magnitude, head_dim)
        self.high = SpectralHead(dim, n_freqs - split_bin, max_log_magnitude, head_dim)

    def zero_magnitude_output(self) -> None:
        self.low.zero_magnitude_output()
        self.high.zero_magnitude_output()

    def forward(self, hidden: torch.Tensor, log_magnitude_prior: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        split = self.low.magnitude_bins
        low_prior, high_prior = (None, None) if log_magnitude_prior is None else \
            (log_magnitude_prior[:, :split], log_magnitude_prior[:, split:])
        return tuple(torch.cat([low, high], dim=1)
                     for low, high in zip(self.low(hidden, low_prior), self.high(hidden, high_prior)))
