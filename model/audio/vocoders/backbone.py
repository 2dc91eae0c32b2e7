"""ConvNeXt backbone of the frequency-domain vocoders (the Vocos backbone): it keeps the mel's frame rate."""

import torch
from torch import nn


class ConvNeXtBlock(nn.Module):
    """Depthwise conv (kernel 7) → LayerNorm → Linear(dim, intermediate) → GELU → Linear(intermediate, dim),
    scaled per channel (layer scale) and added to the input.

    x: (B, dim, T) → (B, dim, T)
    """

    def __init__(self, dim: int, intermediate_dim: int, layer_scale_init: float):
        super().__init__()
        self.depthwise = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.expand = nn.Linear(dim, intermediate_dim)
        self.activation = nn.GELU()
        self.project = nn.Linear(intermediate_dim, dim)
        self.layer_scale = nn.Parameter(torch.full((dim,), float(layer_scale_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(x).transpose(1, 2)  # (B, T, dim)
        h = self.project(self.activation(self.expand(self.norm(h))))
        return x + (self.layer_scale * h).transpose(1, 2)


class ConvNeXtBackbone(nn.Module):
    """Conv1d embedding (kernel 7) → LayerNorm → n_layers ConvNeXt blocks → LayerNorm.

    mel: (B, n_mels, T) → hidden: (B, T, dim)
    """

    def __init__(self, n_mels: int, dim: int, intermediate_dim: int, n_layers: int):
        super().__init__()
        self.embed = nn.Conv1d(n_mels, dim, kernel_size=7, padding=3)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.blocks = nn.ModuleList(ConvNeXtBlock(dim, intermediate_dim, 1.0 / n_layers) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(_init_weights)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(mel).transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x.transpose(1, 2))


def _init_weights(module: nn.Module) -> None:
    """Truncated normal (std 0.02) weights and zero biases for convolutions and linears, as in ConvNeXt/Vocos."""
    if isinstance(module, (nn.Conv1d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
