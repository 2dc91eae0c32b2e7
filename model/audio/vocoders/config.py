"""VocoderConfig: architecture, audio features, discriminators and loss weights of a vocoder (configs/vocoder/)."""

import dataclasses
from typing import ClassVar, Optional

from megatransformer_utils import YamlConfig
from model.audio.features import AudioFeatureConfig

VOCODER_TYPES = ("freq_domain", "lightheaded", "splitband")
DISCRIMINATORS = ("mpd", "msd", "mrd")
ADVERSARIAL_LOSSES = ("hinge", "lsgan")
FEATURE_KEYS = tuple(field.name for field in dataclasses.fields(AudioFeatureConfig))


@dataclasses.dataclass
class VocoderConfig(YamlConfig):
    """A mel → waveform vocoder that predicts STFT magnitude and phase (see model/audio/vocoders/base.py).

    vocoder_type: freq_domain (full linear heads, as Vocos), lightheaded (bottleneck heads of head_dim),
    splitband (separate heads below and above split_frequency, bottlenecked when head_dim is set).
    """

    FAMILIES: ClassVar[tuple] = ("vocoder",)
    CHOICES: ClassVar[dict] = {"vocoder_type": VOCODER_TYPES, "adversarial_loss": ADVERSARIAL_LOSSES,
                               "mel_scale": ("htk", "slaney"), "mel_norm": (None, "slaney")}
    DERIVED: ClassVar[dict] = {"win_length": ("n_fft",), "f_max": ("sample_rate",)}

    vocoder_type: str = "freq_domain"

    # audio features (model/audio/features.py): the mel the vocoder reads and the STFT it predicts
    sample_rate: int = 16000
    n_mels: int = 80
    n_fft: int = 1024
    hop_length: int = 256
    win_length: Optional[int] = None  # default n_fft
    f_min: float = 0.0
    f_max: Optional[float] = None  # default sample_rate / 2
    mel_scale: str = "slaney"
    mel_norm: Optional[str] = "slaney"
    log_floor: float = 1e-5

    # generator: ConvNeXt backbone and spectral heads
    dim: int = 512
    intermediate_dim: int = 1536
    n_layers: int = 8
    head_dim: Optional[int] = None  # bottleneck width of the heads (lightheaded: required; splitband: optional)
    split_frequency: float = 4000.0  # Hz between the low and high band heads (splitband)
    max_log_magnitude: float = 6.0  # smooth upper bound of the predicted log-magnitude (exp(6) ≈ 403)
    # the magnitude head predicts a log-correction to the least-squares inverse of the mel filterbank (the
    # magnitude Griffin-Lim starts from) instead of the whole log-magnitude
    magnitude_prior: bool = False

    # reconstruction losses
    mel_loss_weight: float = 45.0
    stft_loss_weight: float = 1.0  # multi-resolution STFT: spectral convergence + log magnitude
    stft_resolutions: list = dataclasses.field(
        default_factory=lambda: [[512, 128, 512], [1024, 256, 1024], [2048, 512, 2048]])  # [n_fft, hop, win]
    phase_loss_weight: float = 1.0  # instantaneous phase + group delay + instantaneous frequency

    # adversarial training
    discriminators: list = dataclasses.field(default_factory=lambda: ["mpd", "mrd"])
    mpd_periods: list = dataclasses.field(default_factory=lambda: [2, 3, 5, 7, 11])
    msd_scales: int = 3
    mrd_fft_sizes: list = dataclasses.field(default_factory=lambda: [2048, 1024, 512])
    discriminator_width: float = 1.0  # channel multiplier of every discriminator (1.0 = HiFi-GAN/UnivNet sizes)
    adversarial_loss: str = "hinge"
    adversarial_loss_weight: float = 1.0
    feature_matching_loss_weight: float = 2.0

    @property
    def features(self) -> AudioFeatureConfig:
        return AudioFeatureConfig(**{key: getattr(self, key) for key in FEATURE_KEYS})

    @property
    def split_bin(self) -> int:
        """First STFT bin of the high band: the bin nearest split_frequency."""
        return round(self.split_frequency * self.n_fft / self.sample_rate)

    def resolve_derived(self) -> None:
        if self.win_length is None:
            self.win_length = self.n_fft
        if self.f_max is None:
            self.f_max = self.sample_rate / 2

    def validate(self) -> None:
        self.features  # AudioFeatureConfig checks the feature values and names the bad one
        for key in ("dim", "intermediate_dim", "n_layers", "msd_scales"):
            _require(getattr(self, key) >= 1,
                     f"config key '{key}' must be a positive integer, got {getattr(self, key)}")
        for key in ("max_log_magnitude", "discriminator_width"):
            _require(getattr(self, key) > 0, f"config key '{key}' must be positive, got {getattr(self, key)}")
        for key in ("mel_loss_weight", "stft_loss_weight", "phase_loss_weight", "adversarial_loss_weight",
                    "feature_matching_loss_weight"):
            _require(getattr(self, key) >= 0, f"config key '{key}' must not be negative, got {getattr(self, key)}")
        _require(self.mel_loss_weight + self.stft_loss_weight + self.phase_loss_weight > 0,
                 "at least one of mel_loss_weight, stft_loss_weight, phase_loss_weight must be positive")
        if self.vocoder_type == "lightheaded":
            _require(self.head_dim is not None, "vocoder_type=lightheaded needs head_dim (the heads' bottleneck width)")
        if self.vocoder_type == "freq_domain":
            _require(self.head_dim is None, "head_dim is set but vocoder_type=freq_domain has full-width heads: "
                                            "use vocoder_type=lightheaded for bottleneck heads")
        _require(self.head_dim is None or self.head_dim >= 1, f"head_dim must be null or >= 1, got {self.head_dim}")
        if self.vocoder_type == "splitband":
            _require(0 < self.split_bin < self.n_fft // 2,
                     f"split_frequency={self.split_frequency} Hz must fall strictly inside (0, "
                     f"{self.sample_rate / 2} Hz) at least one STFT bin ({self.sample_rate / self.n_fft} Hz) from "
                     "either end")
        self._validate_lists()

    def _validate_lists(self) -> None:
        _require(all(isinstance(r, list) and len(r) == 3 and all(_positive_int(v) for v in r) and r[2] <= r[0]
                     and r[1] <= r[2] for r in self.stft_resolutions) and self.stft_resolutions,
                 f"stft_resolutions must be a non-empty list of [n_fft, hop, win] with hop <= win <= n_fft, "
                 f"got {self.stft_resolutions}")
        _require(all(d in DISCRIMINATORS for d in self.discriminators)
                 and len(set(self.discriminators)) == len(self.discriminators),
                 f"discriminators must be a list of distinct names from {', '.join(DISCRIMINATORS)} "
                 f"(an empty list trains without adversarial losses), got {self.discriminators}")
        _require(self.mpd_periods and all(_positive_int(p) for p in self.mpd_periods),
                 f"mpd_periods must be a non-empty list of positive integers, got {self.mpd_periods}")
        _require(self.mrd_fft_sizes and all(_positive_int(n) and n >= 16 for n in self.mrd_fft_sizes),
                 f"mrd_fft_sizes must be a non-empty list of integers >= 16, got {self.mrd_fft_sizes}")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
