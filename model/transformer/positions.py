"""Position information: learned and sinusoidal absolute embeddings, rotary embeddings, ALiBi biases.

Positions come from `position_ids: (B, T)`, which callers derive from the attention mask so that a
left-padded sequence sees the same positions as the unpadded one (see `position_ids_from_mask`).
"""

import math

import torch
from torch import nn


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask: (B, T) with 1 for real tokens → position ids (B, T); padding gets position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """The fixed embedding of Vaswani et al.: (n_positions, dim), sin in even dims and cos in odd dims."""
    position = torch.arange(n_positions, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table.float()


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al.) in the half-split layout used by GPT-NeoX and Llama.

    `rotary_dim` ≤ head size gives partial rotary: only the first `rotary_dim` dims of each head rotate.
    """

    def __init__(self, rotary_dim: int, base: float):
        super().__init__()
        self.rotary_dim = rotary_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: (B, T) → (cos, sin), each (B, 1, T, rotary_dim), computed in float32."""
        freqs = position_ids[:, :, None].float() * self.inv_freq.float()[None, None, :]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, head_dim); cos/sin: (B, 1, T, rotary_dim) → x with its first rotary_dim dims rotated."""
    rotary_dim = cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = rotated.chunk(2, dim=-1)
    rotated = rotated * cos + torch.cat((-second, first), dim=-1) * sin
    return torch.cat((rotated, passed), dim=-1) if passed.shape[-1] else rotated


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022): (n_heads,).

    For a power of two n the slopes are 2^(-8/n), 2^(-16/n), ...; otherwise the slopes of the closest
    smaller power of two are followed by every other slope of the next larger one.
    """
    closest_power = 2 ** math.floor(math.log2(n_heads))

    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    slopes = geometric(closest_power)
    if closest_power < n_heads:
        slopes += geometric(2 * closest_power)[0::2][: n_heads - closest_power]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """slopes: (H,), key_positions: (B, Tk) → additive attention bias (B, H, 1, Tk).

    ALiBi penalises attention by slope * (query_pos - key_pos). The query term is the same for a whole
    softmax row, so adding slope * key_pos gives the same attention weights (as BLOOM does).
    """
    return slopes[None, :, None, None] * key_positions[:, None, None, :].to(slopes.dtype)
