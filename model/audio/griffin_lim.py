"""Griffin-Lim on our log-mel: the training-free baseline a trained vocoder should beat.

    baseline = GriffinLimVocoder(vocoder.config, n_iter=64)   # any config with .features (an AudioFeatureConfig)
    waveform, _ = baseline(mel)                                 # mel (B, n_mels, T) → (B, (T - 1) * hop_length)

It inverts exactly features.log_mel: the mel energies are exp(mel) (the log floor stays as a tiny energy), the
STFT magnitude is the non-negative least-squares solution of `banks.T @ magnitude = energies` (torchaudio's
InverseMelScale, built with the same Slaney/HTK scale and norm as features.mel_filterbank), and the phase comes
from torchaudio's GriffinLim (fast Griffin-Lim with momentum 0.99) with our STFT's size, hop, window and centred
framing, at power 1 (our mel is of magnitudes, not power). Both transforms run in float32 on the mel's device.
The initial phase is zero (`rand_init=False`), so the baseline gives the same audio on every run.
"""

import torch
import torchaudio
from torch import nn

from model.audio.features import WINDOWS, num_samples


class GriffinLimVocoder(nn.Module):
    """mel (B, n_mels, T) → (waveform (B, (T - 1) * hop_length) float32, None): the vocoders' call signature
    (they also return their complex STFT; Griffin-Lim has none worth returning). `config` is a VocoderConfig (or
    anything with `.features`, an AudioFeatureConfig); it is kept as `.config` for code that reads
    sample_rate, n_fft and the metrics' STFT resolutions from it."""

    def __init__(self, config, n_iter: int = 64, momentum: float = 0.99):
        super().__init__()
        if n_iter < 1:
            raise ValueError(f"Griffin-Lim needs at least 1 iteration, got {n_iter}")
        if not 0 <= momentum < 1:
            raise ValueError(f"Griffin-Lim momentum must be in [0, 1), got {momentum}")
        self.config, self.features, self.n_iter, self.momentum = config, config.features, n_iter, momentum
        features = self.features
        self.inverse_mel = torchaudio.transforms.InverseMelScale(
            features.n_freqs, features.n_mels, features.sample_rate, features.f_min, features.f_max,
            norm=features.mel_norm, mel_scale=features.mel_scale, driver="gelsd")

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, None]:
        if mel.dim() != 3 or mel.shape[1] != self.features.n_mels or mel.shape[2] < 2:
            raise ValueError(f"Griffin-Lim expects a log-mel (B, n_mels={self.features.n_mels}, T >= 2), "
                             f"got shape {tuple(mel.shape)}")
        with torch.autocast(mel.device.type, enabled=False):
            features = self.features
            magnitude = self.inverse_mel.to(mel.device)(torch.exp(mel.float()))  # (B, n_freqs, T)
            waveform = torchaudio.functional.griffinlim(
                magnitude, WINDOWS.hann(features.win_length, mel.device), features.n_fft, features.hop_length,
                features.win_length, power=1.0, n_iter=self.n_iter, momentum=self.momentum,
                length=num_samples(mel.shape[-1], features), rand_init=False)
            return waveform, None
