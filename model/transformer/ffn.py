"""Position-wise feed-forward: a plain MLP (gelu, gelu_tanh, relu, relu2, silu) or a gated one (swiglu, geglu, reglu)."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatransformer_utils import MegaTransformerConfig

_PLAIN = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "silu": F.silu,
}
_GATED = {"swiglu": F.silu, "geglu": F.gelu, "reglu": F.relu}


def activate(name: str, h: torch.Tensor) -> torch.Tensor:
    """Apply activation `name`. For gated ones h: (..., 2I) = [gate, value] → act(gate) * value: (..., I)."""
    if name in _GATED:
        gate, value = h.chunk(2, dim=-1)
        return _GATED[name](gate) * value
    return _PLAIN[name](h)


class FeedForward(nn.Module):
    """x: (B, T, hidden_size) → (B, T, hidden_size) through `intermediate_size` hidden units."""

    def __init__(self, config: MegaTransformerConfig):
        super().__init__()
        self.activation = config.intermediate_activation
        width = config.intermediate_size * (2 if config.is_gated else 1)
        self.fc_in = nn.Linear(config.hidden_size, width, bias=config.use_ffn_bias)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.use_ffn_bias)

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, None]:
        """token_mask is accepted for a uniform interface with MixtureOfExperts; a dense FFN has no aux loss."""
        return self.fc_out(activate(self.activation, self.fc_in(x))), None
