"""Frequency-domain vocoders (Vocos-style): mel → ConvNeXt backbone → magnitude and phase heads → complex
STFT → iSTFT.

Lengths: a mel of T frames (from features.log_mel of S samples, T = 1 + S // hop_length) gives
(T - 1) * hop_length samples, the first S - S % hop_length samples of the clip it came from; frame t of the
predicted STFT is centred on sample t * hop_length, exactly as in features.stft of that clip.
"""

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
from torch import nn

from model.audio.features import istft, magnitude_from_mel
from model.audio.vocoders.backbone import ConvNeXtBackbone
from model.audio.vocoders.config import VocoderConfig
from model.audio.vocoders.heads import SpectralHead, SplitBandSpectralHead


class VocoderPrediction(NamedTuple):
    """Everything a vocoder predicts for a mel (B, n_mels, T); all float32."""

    waveform: torch.Tensor  # (B, (T - 1) * hop_length)
    stft: torch.Tensor  # complex (B, n_fft // 2 + 1, T)
    log_magnitude: torch.Tensor  # (B, n_fft // 2 + 1, T)
    phase: torch.Tensor  # (B, n_fft // 2 + 1, T), wrapped to (-π, π]


class FrequencyDomainVocoderBase(nn.Module, ABC):
    """The shared generator; subclasses choose the spectral head. With config.magnitude_prior the magnitude head
    starts at zero and learns a log-correction to the mel's least-squares magnitude (features.magnitude_from_mel).

    forward(mel (B, n_mels, T)) → (waveform (B, (T - 1) * hop_length), stft (B, n_fft // 2 + 1, T) complex).
    Works with float32 or bfloat16 weights: the mel is cast to the weights' dtype, and the heads' outputs
    to float32 before the exponential and the iSTFT.
    """

    def __init__(self, config: VocoderConfig):
        super().__init__()
        self.config = config
        self.features = config.features
        self.backbone = ConvNeXtBackbone(config.n_mels, config.dim, config.intermediate_dim, config.n_layers)
        self.head = self.build_head(config)
        if config.magnitude_prior:
            self.head.zero_magnitude_output()

    @abstractmethod
    def build_head(self, config: VocoderConfig) -> nn.Module:
        """A module mapping hidden (B, T, dim) → log_magnitude, real, imag, each (B, n_fft // 2 + 1, T) float32,
        the phase being atan2(imag, real)."""

    def predict(self, mel: torch.Tensor) -> VocoderPrediction:
        """mel: (B, n_mels, T) log-mel from features.log_mel → VocoderPrediction (for training: with the phase)."""
        log_magnitude, real, imag, spec = self._spectrum(mel)
        return VocoderPrediction(istft(spec, self.features), spec, log_magnitude, torch.atan2(imag, real))

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        *_, spec = self._spectrum(mel)
        return istft(spec, self.features), spec

    def _spectrum(self, mel: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """mel (B, n_mels, T) → log_magnitude, real, imag (B, F, T) float32 and the complex STFT (B, F, T)."""
        if mel.dim() != 3 or mel.shape[1] != self.config.n_mels or mel.shape[2] < 2:
            raise ValueError(f"vocoder expects a log-mel (B, n_mels={self.config.n_mels}, T >= 2), "
                             f"got shape {tuple(mel.shape)}")
        hidden = self.backbone(mel.to(self.backbone.embed.weight.dtype))
        prior = torch.log(magnitude_from_mel(mel, self.features)) if self.config.magnitude_prior else None
        log_magnitude, real, imag = self.head(hidden, prior)
        # magnitude · (real + i imag) / |real + i imag|: the polar form without cos/sin (cheaper in backward)
        scale = torch.exp(log_magnitude) * torch.rsqrt(real.square() + imag.square() + 1e-12)
        return log_magnitude, real, imag, torch.complex(real * scale, imag * scale)


class FrequencyDomainVocoder(FrequencyDomainVocoderBase):
    """Full-width linear magnitude and phase heads over all n_fft // 2 + 1 bins (Vocos' ISTFT head)."""

    def build_head(self, config: VocoderConfig) -> nn.Module:
        return SpectralHead(config.dim, config.n_fft // 2 + 1, config.max_log_magnitude)


class LightHeadedFrequencyDomainVocoder(FrequencyDomainVocoderBase):
    """Magnitude and phase heads that each project through a head_dim bottleneck (fewer parameters and FLOPs
    than full-width heads when head_dim is well below dim)."""

    def build_head(self, config: VocoderConfig) -> nn.Module:
        return SpectralHead(config.dim, config.n_fft // 2 + 1, config.max_log_magnitude, config.head_dim)


class SplitBandFrequencyDomainVocoder(FrequencyDomainVocoderBase):
    """Separate heads for the bins below split_frequency and for those above it."""

    def build_head(self, config: VocoderConfig) -> nn.Module:
        return SplitBandSpectralHead(config.dim, config.n_fft // 2 + 1, config.split_bin, config.max_log_magnitude,
                                     config.head_dim)
