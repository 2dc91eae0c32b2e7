"""The input side shared by every decoder: token embeddings, absolute positions, and the attention inputs
(rotary tables, ALiBi and mask biases) that all blocks of one forward pass use."""

from typing import Optional

import torch
from torch import nn

from megatransformer_utils import MegaTransformerConfig
from model.transformer.attention import AttentionInputs, build_attention_bias
from model.transformer.positions import (RotaryEmbedding, alibi_bias, alibi_slopes, position_ids_from_mask,
                                         sinusoidal_table)
from model.transformer.static_cache import slot_attention_bias


class DecoderEmbedding(nn.Module):
    """input_ids: (B, T) → hidden states (B, T, hidden_size) and the blocks' AttentionInputs."""

    def __init__(self, config: MegaTransformerConfig):
        super().__init__()
        self.config = config
        self.tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.positions = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                          if config.use_positional_embedding else None)
        if config.use_sinusoidal_embedding:
            self.register_buffer("sinusoidal", sinusoidal_table(config.max_position_embeddings, config.hidden_size),
                                 persistent=False)
        self.rotary = RotaryEmbedding(config.rotary_dim, config.rotary_base) if config.use_rotary_embedding else None
        if config.use_alibi_bias:
            self.register_buffer("alibi_slopes", alibi_slopes(config.n_heads), persistent=False)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                past_length: int = 0, token_embeddings: Optional[torch.Tensor] = None,
                span_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, AttentionInputs]:
        """attention_mask: (B, past_length + T), 1 for real tokens, covering cached positions too.
        position_ids: (B, T); by default counted from the mask (left padding is skipped) or from past_length.
        token_embeddings: (B, T, hidden_size) used instead of the embedding of input_ids (the multimodal model
        puts media patches there), or None. span_ids: (B, past_length + T) bidirectional spans (see
        build_attention_bias), or None."""
        B, T = input_ids.shape
        key_length = past_length + T
        if attention_mask is not None and attention_mask.shape != (B, key_length):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, cached + new "
                             f"tokens) = {(B, key_length)}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = position_ids_from_mask(attention_mask)[:, past_length:]
            else:
                position_ids = torch.arange(past_length, key_length, device=input_ids.device).expand(B, T)
        uses_table = self.positions is not None or self.config.use_sinusoidal_embedding
        if uses_table and int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"position {int(position_ids.max())} is beyond max_position_embeddings="
                             f"{self.config.max_position_embeddings} of the absolute position embedding")

        x = self.embed(input_ids, position_ids, token_embeddings)
        rotary = self.rotary(position_ids, x.dtype) if self.rotary is not None else None
        position_bias = None
        if self.config.use_alibi_bias:
            key_positions = (position_ids_from_mask(attention_mask) if attention_mask is not None
                             else torch.arange(key_length, device=x.device).expand(B, key_length))
            position_bias = alibi_bias(self.alibi_slopes, key_positions)
        bias, is_causal = build_attention_bias(attention_mask, T, key_length, self.config.sliding_window,
                                               position_bias, x.dtype, x.device, span_ids)
        return x, AttentionInputs(rotary=rotary, bias=bias, is_causal=is_causal)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
              token_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, position_ids: (B, T) → token (+ absolute position) embeddings (B, T, hidden_size);
        token_embeddings (B, T, hidden_size), when given, replace the token lookup (media spans)."""
        x = self.tokens(input_ids) if token_embeddings is None else token_embeddings
        if self.positions is not None:
            x = x + self.positions(position_ids)
        if self.config.use_sinusoidal_embedding:
            x = x + self.sinusoidal[position_ids].to(x.dtype)
        return self.dropout(x)

    def static_cache_inputs(self, position_ids: torch.Tensor, key_mask: torch.Tensor, slots: torch.Tensor,
                            dtype: torch.dtype) -> AttentionInputs:
        """The attention inputs of T queries at cache slots `slots` (T,) of a StaticKVCache whose S slots
        hold real tokens where key_mask (B, S) is 1. position_ids: (B, T). No data-dependent Python control
        flow, so a compiled decode step traces it once."""
        rotary = self.rotary(position_ids, dtype) if self.rotary is not None else None
        position_bias = (alibi_bias(self.alibi_slopes, position_ids_from_mask(key_mask))
                         if self.config.use_alibi_bias else None)
        bias = slot_attention_bias(key_mask, slots, self.config.sliding_window, position_bias, dtype)
        return AttentionInputs(rotary=rotary, bias=bias, is_causal=False)
