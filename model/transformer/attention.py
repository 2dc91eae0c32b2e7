"""Multi-head attention with grouped key/value heads (MHA, GQA, MQA), rotary or ALiBi positions and a KV cache.

Query/key heads have `d_queries` dims and value heads `d_values` dims, both independent of
`hidden_size`. `n_query_groups` key/value heads are shared by `n_heads // n_query_groups` query heads
each. The math runs in `torch.nn.functional.scaled_dot_product_attention`: with its built-in causal
mask (the fast path) when nothing else constrains attention, with an additive bias otherwise.
"""

from dataclasses import dataclass
from typing import Hashable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatransformer_utils import MegaTransformerConfig
from model.transformer.positions import apply_rotary


@dataclass
class AttentionInputs:
    """What every attention layer of one forward pass shares.

    rotary: (cos, sin), each (B, 1, T, rotary_dim), or None.
    bias: additive float bias broadcastable to (B, H, T, Tk), or None.
    is_causal: use SDPA's own causal mask (only when bias is None and T == Tk).
    """

    rotary: Optional[tuple[torch.Tensor, torch.Tensor]]
    bias: Optional[torch.Tensor]
    is_causal: bool


def build_attention_bias(
    key_mask: Optional[torch.Tensor],
    query_length: int,
    key_length: int,
    sliding_window: Optional[int],
    position_bias: Optional[torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    span_ids: Optional[torch.Tensor] = None,
) -> tuple[Optional[torch.Tensor], bool]:
    """Combine causality, padding, a sliding window, a position bias and bidirectional spans into SDPA's arguments.

    key_mask: (B, Tk), 1 for real tokens, or None. The T queries are the last T of the Tk keys.
    position_bias: (B, H, 1, Tk) (ALiBi) or None.
    span_ids: (B, Tk) int, 0 for ordinary (causal) positions and one positive id per bidirectional span (the
    patches of one image): positions of the same span see each other whatever their order. None: no spans.
    Returns (bias, is_causal): bias is None when SDPA can apply causality alone (is_causal=True), or
    when nothing is masked at all (a single new query with a cache). Masked entries get the dtype's
    most negative value rather than -inf, so a fully padded query row stays finite.
    """
    window_matters = sliding_window is not None and sliding_window < key_length
    has_padding = key_mask is not None and not bool(key_mask.all())
    has_spans = span_ids is not None and bool(span_ids.any())
    if not window_matters and not has_padding and position_bias is None and not has_spans:
        if query_length == key_length:
            return None, True
        if query_length == 1:
            return None, False
    query_positions = torch.arange(key_length - query_length, key_length, device=device)[:, None]
    key_positions = torch.arange(key_length, device=device)[None, :]
    allowed = key_positions <= query_positions
    if window_matters:
        allowed = allowed & (query_positions - key_positions < sliding_window)
    allowed = allowed[None, None]
    if has_spans:
        query_spans = span_ids[:, key_length - query_length:, None]
        allowed = allowed | ((query_spans == span_ids[:, None, :]) & (query_spans > 0))[:, None]
    if has_padding:
        allowed = allowed & key_mask.bool()[:, None, None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    bias = bias.masked_fill(~allowed, torch.finfo(dtype).min)
    if position_bias is not None:
        bias = bias + position_bias.to(dtype)
    return bias, False


class KVCache:
    """Keys and values of past positions for incremental decoding, one entry per attention layer.

    Buffers grow by doubling, so appending one token is amortised O(1) instead of a full copy.
    Layers are keyed by any hashable (a layer index; the recurrent model adds the iteration).
    """

    def __init__(self):
        self._keys: dict[Hashable, torch.Tensor] = {}
        self._values: dict[Hashable, torch.Tensor] = {}
        self._lengths: dict[Hashable, int] = {}

    def __len__(self) -> int:
        """Number of cached positions (of the first layer written)."""
        return next(iter(self._lengths.values()), 0)

    def update(self, layer: Hashable, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys: (B, G, T, d_queries), values: (B, G, T, d_values) → all cached keys and values (…, Tk, …)."""
        start = self._lengths.get(layer, 0)
        end = start + keys.shape[2]
        if layer not in self._keys or self._keys[layer].shape[2] < end:
            capacity = max(end, 2 * start, 16)
            self._keys[layer] = self._grow(self._keys.get(layer), keys, start, capacity)
            self._values[layer] = self._grow(self._values.get(layer), values, start, capacity)
        self._keys[layer][:, :, start:end] = keys
        self._values[layer][:, :, start:end] = values
        self._lengths[layer] = end
        return self._keys[layer][:, :, :end], self._values[layer][:, :, :end]

    def __contains__(self, layer: Hashable) -> bool:
        return layer in self._lengths

    def get(self, layer: Hashable) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys (B, G, Tk, d_queries) and values (B, G, Tk, d_values) of one layer."""
        end = self._lengths[layer]
        return self._keys[layer][:, :, :end], self._values[layer][:, :, :end]

    def truncate(self, layer: Hashable, length: int) -> None:
        """Forget the positions of `layer` from `length` on (the recurrent model's trial decodes roll back)."""
        self._lengths[layer] = min(self._lengths[layer], length)

    @staticmethod
    def _grow(old: Optional[torch.Tensor], new: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
        buffer = new.new_empty(new.shape[0], new.shape[1], capacity, new.shape[3])
        if old is not None:
            buffer[:, :, :used] = old[:, :, :used]
        return buffer


class Attention(nn.Module):
    """Self-attention. x: (B, T, hidden_size) → (B, T, hidden_size)."""

    def __init__(self, config: MegaTransformerConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads = config.n_heads
        self.n_query_groups = config.n_query_groups
        self.d_queries = config.d_queries
        self.d_values = config.d_values
        self.dropout = config.attention_dropout
        self.split_sizes = (config.n_heads * config.d_queries, config.n_query_groups * config.d_queries,
                            config.n_query_groups * config.d_values)
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.split_sizes), bias=config.use_qkv_bias)
        self.o_proj = nn.Linear(config.n_heads * config.d_values, config.hidden_size, bias=config.use_attn_output_bias)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache: Optional[KVCache] = None,
                cache_key: Optional[Hashable] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q = q.view(B, T, self.n_heads, self.d_queries).transpose(1, 2)
        k = k.view(B, T, self.n_query_groups, self.d_queries).transpose(1, 2)
        v = v.view(B, T, self.n_query_groups, self.d_values).transpose(1, 2)
        if inputs.rotary is not None:
            cos, sin = inputs.rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index if cache_key is None else cache_key, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=inputs.bias, is_causal=inputs.is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_query_groups != self.n_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.d_values))
