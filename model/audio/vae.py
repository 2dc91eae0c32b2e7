"""The audio VAE: log-mel spectrograms to a small 2-D latent and back, the decoder conditioned on a speaker.

    config = AudioVAEConfig.from_name("small")                   # configs/audio_vae/small.yaml
    vae = build_audio_vae(config)
    reconstruction, posterior = vae(mel, speaker)                 # mel: (B, 1, n_mels, T); speaker: (B, S) or None
    latents = vae.encode(mel).sample()                            # (B, C, n_mels / F, ceil(T / r))
    mel = vae.decode(latents, speaker)                            # (B, 1, n_mels, ceil(T / r) * r)

The encoder and decoder are LDM's AutoencoderKL blocks (model/image/vae.py: ResNet blocks, a mid block with
optional attention) with anisotropic resampling: level i downsamples frequency by freq_strides[i] and time by
time_strides[i] (a convolution whose kernel equals its stride), and the decoder mirrors it (nearest-neighbour
upsampling, then a 3x3 convolution). F = prod(freq_strides), r = prod(time_strides) (`small`: 2*2*2 = 8 and
3*5*5 = 75, so 80 mels x T frames -> C x 10 x T/75).

Lengths: any T works. encode pads the mel on the right with `pad_value` (the log-mel floor, silence) up to a
multiple of r; forward crops the reconstruction back to T; decode returns all ceil(T / r) * r frames.
Mels are normalised inside the model, (mel - mel_mean) / mel_std, so its inputs and outputs are raw log-mels.

Speaker: the encoder never sees it, so the latent need not carry it. The decoder is FiLM-conditioned on the
speaker embedding at every resolution: after the input convolution, the mid block and each ResNet block,
h <- h * (1 + film_max_scale * tanh(a)) + film_max_shift * tanh(b), with (a, b) a linear map of the embedding.
Bounded: the scale stays in (1 - film_max_scale, 1 + film_max_scale), the shift within film_max_shift. The maps
start at zero, so an untrained decoder ignores the speaker (FiLM is the identity) until training teaches it.
speaker_embedding_dim 0 builds an unconditioned decoder.
"""

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from megatransformer_utils import YamlConfig
from model.image.vae import MidBlock, ResnetBlock, _group_norm
from model.vae import RECONSTRUCTION_LOSSES, VAE, DiagonalGaussian


def _positive_ints(values) -> bool:
    return bool(values) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


@dataclasses.dataclass
class AudioVAEConfig(YamlConfig):
    """Architecture and loss weights of an audio VAE (and of its discriminator, when use_discriminator)."""

    FAMILIES: ClassVar[tuple] = ("audio_vae",)
    CHOICES: ClassVar[dict] = {"reconstruction_loss": RECONSTRUCTION_LOSSES}

    # architecture
    n_mels: int = 80
    latent_channels: int = 8
    block_out_channels: list = dataclasses.field(default_factory=lambda: [64, 128, 256, 256])  # one per level
    freq_strides: list = dataclasses.field(default_factory=lambda: [2, 2, 2])  # one per downsampling
    time_strides: list = dataclasses.field(default_factory=lambda: [3, 5, 5])
    layers_per_block: int = 2  # ResNet blocks per encoder level (the decoder has one more)
    norm_num_groups: int = 32
    mid_attention: bool = True
    dropout: float = 0.0
    mel_mean: float = -5.0  # normalisation of the log-mel inside the model
    mel_std: float = 2.5
    pad_value: float = math.log(1e-5)  # the log-mel floor (model/audio/features.py log_floor): silence

    # speaker conditioning (FiLM in the decoder)
    speaker_embedding_dim: int = 192  # 0: no speaker conditioning
    film_max_scale: float = 0.9
    film_max_shift: float = 2.0

    # generator loss (model/vae.py: VAELoss)
    reconstruction_loss: str = "l1"
    kl_weight: float = 1e-5

    # discriminator (model/image/discriminators.py, one input channel) and adversarial loss
    use_discriminator: bool = False
    disc_layers: int = 3
    disc_channels: int = 64
    disc_weight: float = 0.5
    disc_start_step: int = 10000
    adaptive_weight_max: float = 1e4

    @property
    def time_downsample(self) -> int:
        """r: input frames per latent frame."""
        return math.prod(self.time_strides)

    @property
    def freq_downsample(self) -> int:
        return math.prod(self.freq_strides)

    @property
    def latent_mels(self) -> int:
        return self.n_mels // self.freq_downsample

    @property
    def image_channels(self) -> int:  # what the PatchGAN reads (model/image/discriminators.py)
        return 1

    def validate(self) -> None:
        for key in ("block_out_channels", "freq_strides", "time_strides"):
            if not _positive_ints(getattr(self, key)):
                raise ValueError(f"config key '{key}' must be a non-empty list of positive integers, "
                                 f"got {getattr(self, key)!r}")
        levels = len(self.block_out_channels)
        if not len(self.freq_strides) == len(self.time_strides) == levels - 1:
            raise ValueError(f"freq_strides {self.freq_strides} and time_strides {self.time_strides} need one entry "
                             f"per downsampling, len(block_out_channels) - 1 = {levels - 1}")
        if self.n_mels % self.freq_downsample:
            raise ValueError(f"n_mels={self.n_mels} must be divisible by the product of freq_strides "
                             f"{self.freq_strides} = {self.freq_downsample}")
        for key in ("n_mels", "latent_channels", "layers_per_block", "norm_num_groups", "disc_layers",
                    "disc_channels"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key '{key}' must be a positive integer, got {getattr(self, key)}")
        uneven = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if uneven:
            raise ValueError(f"block_out_channels {self.block_out_channels} must all be divisible by "
                             f"norm_num_groups={self.norm_num_groups} (not: {uneven})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config key 'dropout' must be in [0, 1), got {self.dropout}")
        if self.speaker_embedding_dim < 0:
            raise ValueError(f"config key 'speaker_embedding_dim' must be 0 (no speaker) or positive, "
                             f"got {self.speaker_embedding_dim}")
        if not 0.0 < self.film_max_scale < 1.0:
            raise ValueError(f"config key 'film_max_scale' must be in (0, 1) (the FiLM scale 1 + s stays positive), "
                             f"got {self.film_max_scale}")
        for key in ("film_max_shift", "mel_std", "adaptive_weight_max"):
            if getattr(self, key) <= 0:
                raise ValueError(f"config key '{key}' must be positive, got {getattr(self, key)}")
        for key in ("kl_weight", "disc_weight", "disc_start_step"):
            if getattr(self, key) < 0:
                raise ValueError(f"config key '{key}' must not be negative, got {getattr(self, key)}")


model_config_lookup = AudioVAEConfig.registry()  # name → config, parsed when looked up


def build_audio_vae(config: AudioVAEConfig | str) -> "AudioVAE":
    """A freshly initialised audio VAE (FiLM maps at zero); a registry name or YAML path works."""
    return AudioVAE(AudioVAEConfig.from_name(config) if isinstance(config, str) else config)


class FiLM(nn.Module):
    """Bounded feature-wise modulation by the speaker. x: (B, C, H, W), speaker: (B, S) -> (B, C, H, W);
    identity at initialisation (see the module docstring)."""

    def __init__(self, speaker_dim: int, channels: int, max_scale: float, max_shift: float):
        super().__init__()
        self.max_scale, self.max_shift = max_scale, max_shift
        self.proj = nn.Linear(speaker_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def scale_and_shift(self, speaker: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """speaker (B, S) -> (1 + scale, shift), each (B, C, 1, 1)."""
        scale, shift = self.proj(speaker).tanh().chunk(2, dim=1)
        return (1 + self.max_scale * scale)[..., None, None], (self.max_shift * shift)[..., None, None]

    def forward(self, x: torch.Tensor, speaker: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_and_shift(speaker.to(x.dtype))
        return torch.addcmul(shift, x, scale)


class Resample(nn.Module):
    """Down: a (f, t)-strided convolution with kernel (f, t): (B, C, H, W) -> (B, C, H / f, W / t). Up: nearest
    (f, t) upsampling, then a 3x3 convolution: (B, C, h, w) -> (B, C, h * f, w * t)."""

    def __init__(self, channels: int, strides: tuple[int, int], up: bool):
        super().__init__()
        self.strides, self.up = strides, up
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if up else \
            nn.Conv2d(channels, channels, strides, stride=strides)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=self.strides, mode="nearest")
        return self.conv(x)


class MelEncoder(nn.Module):
    """normalised mel (B, 1, n_mels, T), T a multiple of r -> moments (B, 2C, n_mels / F, T / r)."""

    def __init__(self, config: AudioVAEConfig):
        super().__init__()
        channels = config.block_out_channels
        self.conv_in = nn.Conv2d(1, channels[0], 3, padding=1)
        self.levels = nn.ModuleList()
        for i, width in enumerate(channels):
            blocks = [ResnetBlock(config, channels[max(i - 1, 0)] if j == 0 else width, width)
                      for j in range(config.layers_per_block)]
            if i < len(channels) - 1:
                blocks.append(Resample(width, (config.freq_strides[i], config.time_strides[i]), up=False))
            self.levels.append(nn.Sequential(*blocks))
        self.mid_block = MidBlock(config, channels[-1])
        self.norm_out = _group_norm(config, channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(mel)
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid_block(h))))


class MelDecoder(nn.Module):
    """latents (B, C, n_mels / F, w), speaker (B, S) or None -> normalised mel (B, 1, n_mels, w * r)."""

    def __init__(self, config: AudioVAEConfig):
        super().__init__()
        channels = config.block_out_channels[::-1]
        freq, time = config.freq_strides[::-1], config.time_strides[::-1]
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(config, channels[0])
        self.levels = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for i, width in enumerate(channels):
            self.levels.append(nn.ModuleList([ResnetBlock(config, channels[max(i - 1, 0)] if j == 0 else width, width)
                                              for j in range(config.layers_per_block + 1)]))
            self.upsamplers.append(Resample(width, (freq[i], time[i]), up=True) if i < len(channels) - 1
                                   else nn.Identity())
        self.norm_out = _group_norm(config, channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], 1, 3, padding=1)
        self.films = None
        if config.speaker_embedding_dim:
            widths = [channels[0], channels[0]] + [width for i, width in enumerate(channels)
                                                   for _ in range(config.layers_per_block + 1)]
            self.films = nn.ModuleList([FiLM(config.speaker_embedding_dim, width, config.film_max_scale,
                                             config.film_max_shift) for width in widths])

    @property
    def last_layer(self) -> nn.Parameter:
        return self.conv_out.weight

    def forward(self, latents: torch.Tensor, speaker: torch.Tensor | None) -> torch.Tensor:
        films = iter(self.films) if self.films is not None else None

        def film(h: torch.Tensor) -> torch.Tensor:
            return next(films)(h, speaker) if films is not None else h

        h = film(self.conv_in(latents))
        h = film(self.mid_block(h))
        for blocks, upsample in zip(self.levels, self.upsamplers):
            for block in blocks:
                h = film(block(h))
            h = upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AudioVAE(VAE):
    """Encoder, 1x1 quant_conv on the moments, 1x1 post_quant_conv on the latents, FiLM-conditioned decoder.
    See the module docstring for shapes, padding and the speaker."""

    def __init__(self, config: AudioVAEConfig):
        super().__init__(MelEncoder(config), MelDecoder(config))
        self.config = config
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a T-frame mel: ceil(T / r)."""
        return -(-int(frames) // self.config.time_downsample)

    def encode_moments(self, mel: torch.Tensor) -> torch.Tensor:
        """mel: (B, 1, n_mels, T) raw log-mel -> moments (B, 2C, n_mels / F, ceil(T / r))."""
        if mel.dim() != 4 or mel.shape[1] != 1 or mel.shape[2] != self.config.n_mels:
            raise ValueError(f"mel must be (B, 1, {self.config.n_mels}, T), got {tuple(mel.shape)}")
        padding = self.latent_frames(mel.shape[-1]) * self.config.time_downsample - mel.shape[-1]
        mel = F.pad(mel, (0, padding), value=self.config.pad_value)
        return self.quant_conv(self.encoder((mel - self.config.mel_mean) / self.config.mel_std))

    def decode(self, latents: torch.Tensor, speaker: torch.Tensor | None = None) -> torch.Tensor:
        """latents: (B, C, n_mels / F, w); speaker: (B, speaker_embedding_dim), needed when the config has one
        -> raw log-mel (B, 1, n_mels, w * r)."""
        config = self.config
        if latents.dim() != 4 or latents.shape[1:3] != (config.latent_channels, config.latent_mels):
            raise ValueError(f"latents must be (B, {config.latent_channels}, {config.latent_mels}, w), "
                             f"got {tuple(latents.shape)}")
        speaker = self._check_speaker(speaker, latents.shape[0])
        normalised = self.decoder(self.post_quant_conv(latents), speaker)
        return normalised * config.mel_std + config.mel_mean

    def forward(self, mel: torch.Tensor, speaker: torch.Tensor | None = None, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """mel (B, 1, n_mels, T), speaker (B, S) -> (reconstruction (B, 1, n_mels, T), posterior)."""
        posterior = self.encode(mel)
        latents = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(latents, speaker)[..., :mel.shape[-1]], posterior

    def _check_speaker(self, speaker: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        dim = self.config.speaker_embedding_dim
        if dim == 0:
            if speaker is not None:
                raise ValueError(f"config '{self.config.name}' has speaker_embedding_dim 0 (no speaker "
                                 "conditioning) but a speaker embedding was given")
            return None
        if speaker is None:
            raise ValueError(f"config '{self.config.name}' decodes with a speaker embedding of width {dim}: pass "
                             "one (B, speaker_embedding_dim)")
        if speaker.dim() != 2 or speaker.shape != (batch, dim):
            raise ValueError(f"speaker embedding has shape {tuple(speaker.shape)}, the VAE expects ({batch}, {dim}) "
                             f"(speaker_embedding_dim={dim} of config '{self.config.name}'): use the speaker encoder "
                             "the VAE was trained with, or set --speaker_embedding_dim to its width")
        return speaker
