"""Normalization layers chosen by config: LayerNorm or RMSNorm (both from torch.nn)."""

from torch import nn

from megatransformer_utils import MegaTransformerConfig


def make_norm(config: MegaTransformerConfig, enabled: bool = True) -> nn.Module:
    """A norm over the last dim of size `hidden_size`, or `nn.Identity()` when `enabled` is false."""
    if not enabled:
        return nn.Identity()
    if config.norm_type == "layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
