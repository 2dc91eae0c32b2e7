"""GAN discriminators for vocoders, combinable by config.

- MultiPeriodDiscriminator (HiFi-GAN): the waveform folded into (S / p, p) for each period p, 2-D convs.
- MultiScaleDiscriminator (HiFi-GAN / MelGAN): grouped 1-D convs on the waveform and on 2x, 4x, ...
  average-pooled copies; the first scale uses spectral norm, the others weight norm.
- MultiResolutionDiscriminator (UnivNet): 2-D convs on linear STFT magnitudes at several FFT sizes
  (hop n_fft / 4), computed with the shared features.stft.

Each takes waveform (B, S) and returns (logits, features): one logits tensor per sub-discriminator and,
per sub-discriminator, the list of its layer outputs (the last one is the logits map). `width` scales every
channel count (1.0 = the published sizes). CombinedDiscriminator runs several and concatenates the lists.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from model.audio.features import AudioFeatureConfig, stft

LEAKY_SLOPE = 0.1


class DiscriminatorOutput(NamedTuple):
    logits: list  # one tensor per sub-discriminator
    features: list  # per sub-discriminator, the list of its layer outputs


def _scaled(channels: int, width: float, multiple: int = 1) -> int:
    """channels * width rounded to a positive multiple of `multiple` (grouped convs need divisible widths)."""
    return max(multiple, round(channels * width / multiple) * multiple)


def _check_waveform(waveform: torch.Tensor) -> None:
    if waveform.dim() != 2:
        raise ValueError(f"discriminators take a waveform (B, S), got shape {tuple(waveform.shape)}")


def _conv_stack(x: torch.Tensor, convs: nn.ModuleList, post: nn.Module) -> tuple[torch.Tensor, list]:
    """Each conv then a leaky ReLU, then `post`: (logits, the feature map after every layer, logits last)."""
    features = []
    for conv in convs:
        x = F.leaky_relu(conv(x), LEAKY_SLOPE)
        features.append(x)
    x = post(x)
    features.append(x)
    return x, features


class PeriodDiscriminator(nn.Module):
    """waveform (B, S) → logits (B, 1, ~S / (81 p), p), after reflect-padding S to a multiple of the period p."""

    def __init__(self, period: int, width: float = 1.0):
        super().__init__()
        self.period = period
        channels = [1] + [_scaled(c, width) for c in (32, 128, 512, 1024, 1024)]
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(c_in, c_out, (5, 1), (3 if i < 4 else 1, 1), padding=(2, 0)))
            for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])))
        self.post = weight_norm(nn.Conv2d(channels[-1], 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, list]:
        x = waveform.to(self.post.bias.dtype).unsqueeze(1)  # (B, 1, S)
        remainder = x.shape[-1] % self.period
        if remainder:
            x = F.pad(x, (0, self.period - remainder), mode="reflect")
        x = x.view(x.shape[0], 1, x.shape[-1] // self.period, self.period)
        return _conv_stack(x, self.convs, self.post)


class ScaleDiscriminator(nn.Module):
    """waveform (B, S) → logits (B, 1, ~S / 64), grouped strided 1-D convs (HiFi-GAN's DiscriminatorS)."""

    LAYERS = ((128, 15, 1, 1), (128, 41, 2, 4), (256, 41, 2, 16), (512, 41, 4, 16), (1024, 41, 4, 16),
              (1024, 41, 1, 16), (1024, 5, 1, 1))  # (out channels, kernel, stride, groups)

    def __init__(self, width: float = 1.0, use_spectral_norm: bool = False):
        super().__init__()
        norm = spectral_norm if use_spectral_norm else weight_norm
        layers, c_in = [], 1
        for c_out, kernel, stride, groups in self.LAYERS:
            c_out = _scaled(c_out, width, 16)
            layers.append(norm(nn.Conv1d(c_in, c_out, kernel, stride, groups=groups, padding=kernel // 2)))
            c_in = c_out
        self.convs = nn.ModuleList(layers)
        self.post = norm(nn.Conv1d(c_in, 1, 3, 1, padding=1))

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, list]:
        x = waveform.to(self.post.bias.dtype).unsqueeze(1)
        return _conv_stack(x, self.convs, self.post)


class ResolutionDiscriminator(nn.Module):
    """waveform (B, S) → logits (B, 1, 1 + S // (n_fft / 4), ~n_fft / 16) from the STFT magnitude (UnivNet)."""

    def __init__(self, n_fft: int, width: float = 1.0):
        super().__init__()
        self.spectrum = AudioFeatureConfig(n_fft=n_fft, hop_length=n_fft // 4)
        channels = _scaled(32, width)
        self.convs = nn.ModuleList([
            weight_norm(nn.Conv2d(1, channels, (3, 9), padding=(1, 4))),
            *(weight_norm(nn.Conv2d(channels, channels, (3, 9), (1, 2), padding=(1, 4))) for _ in range(3)),
            weight_norm(nn.Conv2d(channels, channels, (3, 3), padding=(1, 1))),
        ])
        self.post = weight_norm(nn.Conv2d(channels, 1, (3, 3), padding=(1, 1)))

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, list]:
        magnitude = stft(waveform, self.spectrum).abs()  # (B, F, T) float32
        x = magnitude.transpose(1, 2).unsqueeze(1).to(self.post.bias.dtype)  # (B, 1, T, F)
        return _conv_stack(x, self.convs, self.post)


class _MultiDiscriminator(nn.Module):
    """Runs each sub-discriminator on its own input (see _inputs) and collects logits and features."""

    def __init__(self, discriminators: list, names: list):
        super().__init__()
        self.discriminators = nn.ModuleList(discriminators)
        self.names = names

    def _inputs(self, waveform: torch.Tensor) -> list:
        return [waveform] * len(self.discriminators)

    def forward(self, waveform: torch.Tensor) -> DiscriminatorOutput:
        _check_waveform(waveform)
        logits, features = [], []
        for discriminator, x in zip(self.discriminators, self._inputs(waveform)):
            score, layers = discriminator(x)
            logits.append(score)
            features.append(layers)
        return DiscriminatorOutput(logits, features)


class MultiPeriodDiscriminator(_MultiDiscriminator):
    def __init__(self, periods=(2, 3, 5, 7, 11), width: float = 1.0):
        super().__init__([PeriodDiscriminator(p, width) for p in periods], [f"mpd_period{p}" for p in periods])


class MultiScaleDiscriminator(_MultiDiscriminator):
    def __init__(self, n_scales: int = 3, width: float = 1.0):
        super().__init__([ScaleDiscriminator(width, use_spectral_norm=i == 0) for i in range(n_scales)],
                         [f"msd_scale{i}" for i in range(n_scales)])
        self.pool = nn.AvgPool1d(4, 2, padding=2)

    def _inputs(self, waveform: torch.Tensor) -> list:
        inputs = [waveform]
        for _ in range(len(self.discriminators) - 1):
            inputs.append(self.pool(inputs[-1].unsqueeze(1)).squeeze(1))
        return inputs


class MultiResolutionDiscriminator(_MultiDiscriminator):
    def __init__(self, fft_sizes=(2048, 1024, 512), width: float = 1.0):
        super().__init__([ResolutionDiscriminator(n, width) for n in fft_sizes], [f"mrd_fft{n}" for n in fft_sizes])


class CombinedDiscriminator(nn.Module):
    """Several multi-discriminators run on the same waveform; their lists are concatenated in order.

    forward(waveform (B, S)) → DiscriminatorOutput(logits, features), one entry per sub-discriminator,
    named by `names` (e.g. mpd_period2, ..., mrd_fft512).
    """

    def __init__(self, discriminators: list):
        super().__init__()
        if not discriminators:
            raise ValueError("CombinedDiscriminator needs at least one discriminator")
        self.discriminators = nn.ModuleList(discriminators)
        self.names = [name for d in discriminators for name in d.names]

    def forward(self, waveform: torch.Tensor) -> DiscriminatorOutput:
        logits, features = [], []
        for discriminator in self.discriminators:
            output = discriminator(waveform)
            logits.extend(output.logits)
            features.extend(output.features)
        return DiscriminatorOutput(logits, features)
