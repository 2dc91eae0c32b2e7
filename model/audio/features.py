"""Audio features shared by preprocessing, training and inference: STFT, iSTFT and log-mel.

One code path everywhere, so a vocoder sees at inference exactly the mel it was trained on:

    cfg = AudioFeatureConfig()                     # 16 kHz, 80 mels, n_fft 1024, hop 256
    mel = log_mel(waveform, cfg)                   # waveform (B, S) -> mel (B, 80, 1 + S // 256)
    spec = stft(waveform, cfg)                     # (B, 513, 1 + S // 256) complex
    audio = istft(spec, cfg)                       # (B, (frames - 1) * 256)
    mel[..., :speech_end(mel[0])]                  # one clip without its trailing silence

Framing is centred (torch.stft `center=True`, reflect padding): frame t is centred on sample
t * hop_length, so S samples give `num_frames(S) = 1 + S // hop_length` frames and T frames invert to
`num_samples(T) = (T - 1) * hop_length` samples, the first samples of the input (all of it when S is a
multiple of hop_length).

The mel filterbank follows common vocoder practice (HiFi-GAN, BigVGAN, SpeechT5: librosa's defaults):
Slaney mel scale and Slaney area normalisation applied to the STFT magnitude (power 1), then the natural
log of the mel energies clamped below at `log_floor`. Everything is computed in float32 with autocast off
(torch.stft and FFTs do not run in bfloat16), whatever the input's dtype.
"""

import dataclasses
import math
from functools import lru_cache
from typing import Optional

import torch
from torchaudio.functional import melscale_fbanks

MEL_SCALES = ("htk", "slaney")
MEL_NORMS = (None, "slaney")


@dataclasses.dataclass(frozen=True)
class AudioFeatureConfig:
    """STFT and mel parameters. `win_length` defaults to n_fft and `f_max` to sample_rate / 2; both are
    resolved on construction so to_dict() holds the values actually used."""

    sample_rate: int = 16000
    n_mels: int = 80
    n_fft: int = 1024
    hop_length: int = 256
    win_length: Optional[int] = None
    f_min: float = 0.0
    f_max: Optional[float] = None
    mel_scale: str = "slaney"
    mel_norm: Optional[str] = "slaney"
    log_floor: float = 1e-5

    def __post_init__(self):
        if self.win_length is None:
            object.__setattr__(self, "win_length", self.n_fft)
        if self.f_max is None:
            object.__setattr__(self, "f_max", self.sample_rate / 2)
        object.__setattr__(self, "f_min", float(self.f_min))
        object.__setattr__(self, "f_max", float(self.f_max))
        for key in ("sample_rate", "n_mels", "n_fft", "hop_length", "win_length"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"audio feature '{key}' must be a positive integer, got {value!r}")
        if self.win_length > self.n_fft:
            raise ValueError(f"win_length={self.win_length} must be at most n_fft={self.n_fft}")
        if self.hop_length > self.win_length:
            raise ValueError(f"hop_length={self.hop_length} must be at most win_length={self.win_length}: "
                             "larger hops leave gaps that the iSTFT cannot invert")
        if not 0.0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2 = {self.sample_rate / 2}, "
                             f"got f_min={self.f_min}, f_max={self.f_max}")
        if self.mel_scale not in MEL_SCALES:
            raise ValueError(f"mel_scale must be one of {', '.join(MEL_SCALES)}, got {self.mel_scale!r}")
        if self.mel_norm not in MEL_NORMS:
            raise ValueError(f"mel_norm must be null or 'slaney', got {self.mel_norm!r}")
        if not self.log_floor > 0:
            raise ValueError(f"log_floor must be positive (the log of mel energies is clamped there), "
                             f"got {self.log_floor}")

    @property
    def n_freqs(self) -> int:
        """Frequency bins of the one-sided STFT: n_fft // 2 + 1."""
        return self.n_fft // 2 + 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "AudioFeatureConfig":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown audio feature key(s) {', '.join(unknown)}; "
                             f"valid keys: {', '.join(sorted(known))}")
        return cls(**values)


class SharedWindowBuffer:
    """One Hann window per (size, device, dtype), created on first use and shared by every caller
    (features, losses, discriminators), so no module carries its own copy as a buffer."""

    def __init__(self):
        self._windows: dict[tuple, torch.Tensor] = {}

    def hann(self, size: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The periodic Hann window (size,) on `device` in `dtype` (torch.hann_window's default)."""
        key = (int(size), torch.device(device), dtype)
        window = self._windows.get(key)
        if window is None:
            window = torch.hann_window(size, periodic=True, device=device, dtype=dtype)
            self._windows[key] = window
        return window


WINDOWS = SharedWindowBuffer()


@lru_cache(maxsize=32)
def mel_filterbank(cfg: AudioFeatureConfig, device: torch.device) -> torch.Tensor:
    """torchaudio's mel filterbank (n_freqs, n_mels) in float32 on `device`, cached per (cfg, device)."""
    banks = melscale_fbanks(cfg.n_freqs, cfg.f_min, cfg.f_max, cfg.n_mels, cfg.sample_rate,
                            norm=cfg.mel_norm, mel_scale=cfg.mel_scale)
    return banks.to(device)


def num_frames(num_samples: int, cfg: AudioFeatureConfig) -> int:
    """Frames that stft/log_mel give for `num_samples` samples: 1 + num_samples // hop_length."""
    return 1 + int(num_samples) // cfg.hop_length


def num_samples(frames: int, cfg: AudioFeatureConfig) -> int:
    """Samples that istft (and every vocoder) gives for `frames` frames: (frames - 1) * hop_length."""
    return (int(frames) - 1) * cfg.hop_length


def stft(waveform: torch.Tensor, cfg: AudioFeatureConfig) -> torch.Tensor:
    """Centred STFT with the shared Hann window.

    waveform: (B, S) or (S,), any float dtype → complex64 (B, n_fft // 2 + 1, 1 + S // hop_length)
    (no batch dimension out when none came in).
    """
    if waveform.dim() not in (1, 2):
        raise ValueError(f"stft expects a waveform (B, S) or (S,), got shape {tuple(waveform.shape)}")
    if waveform.shape[-1] <= cfg.n_fft // 2:
        raise ValueError(f"waveform has {waveform.shape[-1]} samples; centred framing (reflect padding) needs "
                         f"more than n_fft // 2 = {cfg.n_fft // 2}: pad or drop clips this short")
    with torch.autocast(waveform.device.type, enabled=False):
        return torch.stft(waveform.float(), cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                          window=WINDOWS.hann(cfg.win_length, waveform.device), center=True, pad_mode="reflect",
                          normalized=False, onesided=True, return_complex=True)


def istft(spec: torch.Tensor, cfg: AudioFeatureConfig, length: Optional[int] = None) -> torch.Tensor:
    """Inverse of stft.

    spec: complex (B, n_fft // 2 + 1, T) → waveform float32 (B, length), where length defaults to
    (T - 1) * hop_length (the samples whose every covering frame is present).
    """
    if not spec.is_complex() or spec.dim() != 3 or spec.shape[1] != cfg.n_freqs:
        raise ValueError(f"istft expects a complex spectrogram (B, {cfg.n_freqs}, T), "
                         f"got {spec.dtype} {tuple(spec.shape)}")
    with torch.autocast(spec.device.type, enabled=False):
        return torch.istft(spec.to(torch.complex64), cfg.n_fft, hop_length=cfg.hop_length,
                           win_length=cfg.win_length, window=WINDOWS.hann(cfg.win_length, spec.device),
                           center=True, normalized=False, onesided=True, length=length)


def mel_from_magnitude(magnitude: torch.Tensor, cfg: AudioFeatureConfig) -> torch.Tensor:
    """Log-mel of an STFT magnitude: magnitude (..., n_freqs, T) → (..., n_mels, T), float32."""
    with torch.autocast(magnitude.device.type, enabled=False):
        banks = mel_filterbank(cfg, magnitude.device)
        mel = torch.matmul(magnitude.float().transpose(-1, -2), banks).transpose(-1, -2)
        return torch.log(torch.clamp(mel, min=cfg.log_floor))


@lru_cache(maxsize=32)
def mel_pseudo_inverse(cfg: AudioFeatureConfig, device: torch.device) -> torch.Tensor:
    """The Moore-Penrose inverse of the filterbank's transpose, (n_freqs, n_mels) float32: the minimum-norm
    least-squares solution that torchaudio's InverseMelScale computes, as one matrix."""
    return torch.linalg.pinv(mel_filterbank(cfg, torch.device("cpu")).double().T).float().to(device)


def magnitude_from_mel(mel: torch.Tensor, cfg: AudioFeatureConfig) -> torch.Tensor:
    """The least-squares STFT magnitude of a log-mel, floored at log_floor (as InverseMelScale, which clamps at
    zero): mel (..., n_mels, T) → (..., n_freqs, T) float32."""
    with torch.autocast(mel.device.type, enabled=False):
        energies = torch.exp(mel.float())
        return torch.clamp(torch.matmul(mel_pseudo_inverse(cfg, mel.device), energies), min=cfg.log_floor)


def log_mel(waveform: torch.Tensor, cfg: AudioFeatureConfig) -> torch.Tensor:
    """Log-mel spectrogram: waveform (..., S) → float32 (..., n_mels, 1 + S // hop_length)."""
    if waveform.dim() == 0:
        raise ValueError("log_mel expects a waveform (..., S), got a scalar")
    leading = waveform.shape[:-1]
    magnitude = stft(waveform.reshape(-1, waveform.shape[-1]), cfg).abs()
    mel = mel_from_magnitude(magnitude, cfg)
    return mel.reshape(*leading, cfg.n_mels, mel.shape[-1])


DECIBELS_PER_NAT = 20 / math.log(10)  # log-mel is ln(magnitude), and 20 log10(m) dB = (20 / ln 10) ln(m)


def speech_end(mel: torch.Tensor, top_db: float = 60.0) -> int:
    """The frames of a log-mel (n_mels, T) that hold sound: 1 + the index of its last frame whose loudest bin is
    within top_db of the clip's loudest bin (librosa.effects.trim's rule, on the right end only). Silence padding
    (the log floor: a magnitude of 1e-5, about 100 dB below speech's loudest bins) is cut; a recording's own quiet
    tail is kept down to top_db. At least 1."""
    if mel.dim() != 2 or mel.shape[-1] == 0:
        raise ValueError(f"speech_end takes one log-mel (n_mels, T) with T >= 1, got shape {tuple(mel.shape)}")
    if top_db <= 0:
        raise ValueError(f"top_db must be positive, got {top_db}")
    loudness = mel.float().amax(dim=0)
    loud = (loudness >= loudness.max() - top_db / DECIBELS_PER_NAT).nonzero()
    return int(loud[-1]) + 1
