"""One transformer block: attention and feed-forward sublayers, each with optional pre and post norms.

    x = post_attn_norm(x + dropout(attn(pre_attn_norm(x))))
    x = post_ffn_norm(x + dropout(ffn(pre_ffn_norm(x))))

Pre norms only: GPT-2/Llama. Post norms only: the original Transformer (post-LN). Both: the
"sandwich" block of Huginn. A disabled norm is the identity.
"""

from typing import Hashable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatransformer_utils import MegaTransformerConfig
from model.transformer.attention import Attention, AttentionInputs, KVCache
from model.transformer.ffn import FeedForward
from model.transformer.moe import MixtureOfExperts
from model.transformer.norms import make_norm


class TransformerBlock(nn.Module):
    """x: (B, T, hidden_size) → (x, aux) where aux is the MoE's (2,) auxiliary losses or None."""

    def __init__(self, config: MegaTransformerConfig, layer_index: int):
        super().__init__()
        self.attn_norm = make_norm(config, config.pre_attn_norm)
        self.attn = Attention(config, layer_index)
        self.attn_post_norm = make_norm(config, config.post_attn_norm)
        self.ffn_norm = make_norm(config, config.pre_ffn_norm)
        self.ffn = MixtureOfExperts(config) if config.ffn_type == "moe" else FeedForward(config)
        self.ffn_post_norm = make_norm(config, config.post_ffn_norm)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache: Optional[KVCache] = None,
                token_mask: Optional[torch.Tensor] = None,
                cache_key: Optional[Hashable] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = self.attn_post_norm(x + self.dropout(self.attn(self.attn_norm(x), inputs, cache, cache_key)))
        h, aux = self.ffn(self.ffn_norm(x), token_mask)
        return self.ffn_post_norm(x + self.dropout(h)), aux


class GradientCheckpointing:
    """A model's switch for gradient checkpointing (off by default): set_gradient_checkpointing(True) makes its
    forward recompute each block's activations in the backward pass instead of storing them, while training."""

    gradient_checkpointing = False

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.gradient_checkpointing = enabled


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, attention_inputs: AttentionInputs, cache: Optional[KVCache],
               token_mask: Optional[torch.Tensor], checkpointing: bool) -> tuple[torch.Tensor, list]:
    """x (B, T, hidden_size) through every block in order → (x, the MoE auxiliary losses of the blocks that have
    them). checkpointing: recompute each block's activations in the backward pass (only while gradients are on)."""
    moe_terms = []
    for block in blocks:
        if checkpointing and torch.is_grad_enabled():
            x, aux = checkpoint(block, x, attention_inputs, cache, token_mask, use_reentrant=False)
        else:
            x, aux = block(x, attention_inputs, cache, token_mask)
        if aux is not None:
            moe_terms.append(aux)
    return x, moe_terms
