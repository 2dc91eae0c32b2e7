"""The image VAE: LDM's AutoencoderKL (ResNet blocks, downsampling, optional mid attention) on model/vae.VAE.

    config = ImageVAEConfig.from_name("small_4_2")          # configs/image_vae/small_4_2.yaml
    vae = build_image_vae(config)                           # vae.config is the config
    reconstruction, posterior = vae(images)                 # images: (B, 3, H, W) in [-1, 1]
    latents = vae.encode(images).sample()                   # (B, latent_channels, H / f, W / f)
    images = vae.decode(latents)                            # (B, 3, H, W)

f = vae.config.downsample_factor = 2 ** (len(block_out_channels) - 1); H and W must be multiples of f.
Config names (configs/image_vae/): `<size>` has 4 latent channels and 3 downsamplings (f8, as Stable Diffusion's
VAE); `<size>_<C>_<D>` has C latent channels and D downsamplings (`small_4_2`: latent 4 x H/4 x W/4); a `gan_`
prefix turns the PatchGAN discriminator on. Sizes: tiny (tests), small.

Parameter names and the computation match diffusers' AutoencoderKL (DownEncoderBlock2D / UpDecoderBlock2D with
the same block_out_channels, layers_per_block, latent_channels, norm_num_groups and mid_block_add_attention), so
its state dict loads here unchanged (tests/test_image_vae.py checks the outputs against diffusers).
"""

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from megatransformer_utils import YamlConfig
from model.vae import RECONSTRUCTION_LOSSES, VAE

NORM_EPS = 1e-6


@dataclasses.dataclass
class ImageVAEConfig(YamlConfig):
    """Architecture and loss weights of an image VAE (and of its discriminator, when use_discriminator)."""

    FAMILIES: ClassVar[tuple] = ("image_vae",)
    CHOICES: ClassVar[dict] = {"reconstruction_loss": RECONSTRUCTION_LOSSES}

    # architecture
    image_channels: int = 3
    latent_channels: int = 4
    block_out_channels: list = dataclasses.field(default_factory=lambda: [128, 256, 512, 512])  # one per level
    layers_per_block: int = 2  # ResNet blocks per encoder level (the decoder has one more)
    norm_num_groups: int = 32
    mid_attention: bool = True  # a single-head self-attention between the two middle ResNet blocks
    dropout: float = 0.0

    # generator loss (model/vae.py: VAELoss)
    reconstruction_loss: str = "l1"
    kl_weight: float = 1e-6  # LDM's meaning: the KL summed over latent elements vs the summed reconstruction loss
    perceptual_weight: float = 0.0  # LPIPS; > 0 needs the `lpips` package and its weights (model/image/losses.py)

    # discriminator (model/image/discriminators.py) and adversarial loss
    use_discriminator: bool = False
    disc_layers: int = 3  # stride-2 convolutions of the PatchGAN; output (B, 1, H / 2**disc_layers - 2, ...)
    disc_channels: int = 64
    disc_weight: float = 0.5
    disc_start_step: int = 10000  # the adversarial terms are off before this optimizer step
    adaptive_weight_max: float = 1e4

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> None:
        channels = self.block_out_channels
        if not channels or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels):
            raise ValueError(f"config key 'block_out_channels' must be a non-empty list of positive integers, "
                             f"got {channels!r}")
        for key in ("image_channels", "latent_channels", "layers_per_block", "norm_num_groups", "disc_layers",
                    "disc_channels"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key '{key}' must be a positive integer, got {getattr(self, key)}")
        uneven = [c for c in channels if c % self.norm_num_groups]
        if uneven:
            raise ValueError(f"block_out_channels {channels} must all be divisible by norm_num_groups="
                             f"{self.norm_num_groups} (not: {uneven})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config key 'dropout' must be in [0, 1), got {self.dropout}")
        for key in ("kl_weight", "perceptual_weight", "disc_weight", "disc_start_step"):
            if getattr(self, key) < 0:
                raise ValueError(f"config key '{key}' must not be negative, got {getattr(self, key)}")
        if self.adaptive_weight_max <= 0:
            raise ValueError(f"config key 'adaptive_weight_max' must be positive, got {self.adaptive_weight_max}")


model_config_lookup = ImageVAEConfig.registry()  # name → config, parsed when looked up


def build_image_vae(config: ImageVAEConfig | str) -> "ImageVAE":
    """A freshly initialised image VAE (PyTorch's default init, as diffusers); a registry name or YAML path works."""
    return ImageVAE(ImageVAEConfig.from_name(config) if isinstance(config, str) else config)


def _group_norm(config: ImageVAEConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(config.norm_num_groups, channels, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice, plus a 1x1 shortcut when the width changes.
    x: (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, config: ImageVAEConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(config, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(config, out_channels)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class MidAttention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual. x: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, config: ImageVAEConfig, channels: int):
        super().__init__()
        self.group_norm = _group_norm(config, channels)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(config.dropout)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = (projection(h).unsqueeze(1) for projection in (self.to_q, self.to_k, self.to_v))  # (B, 1, H*W, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        for layer in self.to_out:
            h = layer(h)
        return x + h.transpose(1, 2).reshape(batch, channels, height, width)


class MidBlock(nn.Module):
    """ResNet, optional attention, ResNet at the lowest resolution. x: (B, C, h, w) -> (B, C, h, w)."""

    def __init__(self, config: ImageVAEConfig, channels: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(config, channels, channels) for _ in range(2)])
        self.attentions = nn.ModuleList([MidAttention(config, channels)] if config.mid_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 conv3x3. x: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a conv3x3. x: (B, C, h, w) -> (B, C, 2h, 2w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """ResNet blocks, then an optional resampler. `resnets`/`downsamplers`/`upsamplers` as named by diffusers."""

    def __init__(self, config: ImageVAEConfig, in_channels: int, out_channels: int, n_blocks: int,
                 resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(config, in_channels if i == 0 else out_channels, out_channels)
                                      for i in range(n_blocks)])
        resampler = {"down": Downsample, "up": Upsample}
        self.resample = resample
        if resample is not None:
            self.add_module(f"{resample}samplers", nn.ModuleList([resampler[resample](out_channels)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.resample is not None:
            x = getattr(self, f"{self.resample}samplers")[0](x)
        return x


class ImageEncoder(nn.Module):
    """images (B, image_channels, H, W) -> moments (B, 2 * latent_channels, H / f, W / f)."""

    def __init__(self, config: ImageVAEConfig):
        super().__init__()
        channels = config.block_out_channels
        self.conv_in = nn.Conv2d(config.image_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            Level(config, channels[max(i - 1, 0)], channels[i], config.layers_per_block,
                  "down" if i < len(channels) - 1 else None)
            for i in range(len(channels))])
        self.mid_block = MidBlock(config, channels[-1])
        self.conv_norm_out = _group_norm(config, channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(images)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(h))))


class ImageDecoder(nn.Module):
    """latents (B, latent_channels, h, w) -> images (B, image_channels, h * f, w * f)."""

    def __init__(self, config: ImageVAEConfig):
        super().__init__()
        channels = config.block_out_channels[::-1]
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(config, channels[0])
        self.up_blocks = nn.ModuleList([
            Level(config, channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1,
                  "up" if i < len(channels) - 1 else None)
            for i in range(len(channels))])
        self.conv_norm_out = _group_norm(config, channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], config.image_channels, 3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        return self.conv_out.weight

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(latents))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class ImageVAE(VAE):
    """AutoencoderKL: encoder, 1x1 quant_conv on the moments, 1x1 post_quant_conv on the latents, decoder.

    images: (B, image_channels, H, W), H and W multiples of config.downsample_factor; see model/vae.VAE for the
    methods (forward, encode, decode, last_layer).
    """

    def __init__(self, config: ImageVAEConfig):
        super().__init__(ImageEncoder(config), ImageDecoder(config))
        self.config = config
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, image_channels, H, W) -> moments (B, 2 * latent_channels, H / f, W / f)."""
        if images.dim() != 4 or images.shape[1] != self.config.image_channels:
            raise ValueError(f"images must be (B, {self.config.image_channels}, H, W), got {tuple(images.shape)}")
        factor = self.config.downsample_factor
        height, width = images.shape[-2:]
        if height % factor or width % factor:
            raise ValueError(f"image size {height}x{width} is not a multiple of the VAE's downsample factor {factor} "
                             f"(config {self.config.name}): resize or crop to e.g. "
                             f"{max(factor, height // factor * factor)}x{max(factor, width // factor * factor)}")
        return self.quant_conv(self.encoder(images))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents: (B, latent_channels, h, w) -> images (B, image_channels, h * f, w * f)."""
        if latents.dim() != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(f"latents must be (B, {self.config.latent_channels}, h, w), got {tuple(latents.shape)}")
        return self.decoder(self.post_quant_conv(latents))
