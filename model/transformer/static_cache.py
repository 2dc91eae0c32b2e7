"""A static (preallocated, fixed-shape) KV cache for compiled decoding, in the manner of PyTorch's gpt-fast.

The growing `KVCache` of attention.py hands attention keys of a new length at every step, so a compiled
step would see a new shape each time. Here every layer owns buffers of a fixed `length` S; a step writes
its T new keys at cache slots `slots` (T,) and attention reads all S slots, with the slots not yet written
(and left padding) masked out by the key mask. Every decode step then has the same shapes, and one
compiled graph serves them all.

    cache = StaticKVCache.for_model(config, batch_size=B, length=S, dtype=..., device=...)
    logits = model.decode_step(input_ids, position_ids, key_mask, slots, cache)
"""

from typing import Optional

import torch

from megatransformer_utils import MegaTransformerConfig


def slot_attention_bias(key_mask: torch.Tensor, slots: torch.Tensor, sliding_window: Optional[int],
                        position_bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The additive attention bias of T queries at cache slots `slots` over all S slots of a static cache.

    key_mask: (B, S), 1 for slots holding a real token (0 for padding and for slots not yet written).
    slots: (T,) the queries' slots. position_bias: (B, H, 1, S) (ALiBi) or None.
    Returns (B, 1 or H, T, S): a query sees the real keys at its own slot and before it (within the sliding
    window); the rest get the dtype's most negative value, as build_attention_bias does.
    """
    key_slots = torch.arange(key_mask.shape[1], device=key_mask.device)
    allowed = key_slots[None, :] <= slots[:, None]
    if sliding_window is not None:
        allowed = allowed & (slots[:, None] - key_slots[None, :] < sliding_window)
    allowed = allowed[None, None] & key_mask.bool()[:, None, None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return bias + position_bias.to(dtype) if position_bias is not None else bias


class StaticKVCache:
    """Keys (B, G, S, d_queries) and values (B, G, S, d_values) of every layer, allocated once."""

    def __init__(self, n_layers: int, batch_size: int, n_query_groups: int, length: int, d_queries: int,
                 d_values: int, dtype: torch.dtype, device: torch.device):
        self.length = length
        self.keys = [torch.zeros(batch_size, n_query_groups, length, d_queries, dtype=dtype, device=device)
                     for _ in range(n_layers)]
        self.values = [torch.zeros(batch_size, n_query_groups, length, d_values, dtype=dtype, device=device)
                       for _ in range(n_layers)]
        for buffer in self.keys + self.values:
            # Fixed addresses: CUDA graphs (torch.compile's "reduce-overhead") may then write into them in place.
            torch._dynamo.mark_static_address(buffer)

    @classmethod
    def for_model(cls, config: MegaTransformerConfig, batch_size: int, length: int, dtype: torch.dtype,
                  device: torch.device) -> "StaticKVCache":
        return cls(config.n_layers, batch_size, config.n_query_groups, length, config.d_queries, config.d_values,
                   dtype, device)

    def fits(self, batch_size: int, length: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether this cache has exactly these shapes (then it can be reused: stale slots are masked)."""
        key = self.keys[0]
        return (key.shape[0], self.length, key.dtype, key.device) == (batch_size, length, dtype, torch.device(device))

    def at(self, slots: torch.Tensor) -> "SlotWriter":
        """A cache that attention layers `update` like a KVCache, writing new keys at `slots` (T,)."""
        return SlotWriter(self, slots)


class SlotWriter:
    """What attention layers see of a StaticKVCache during one step (the KVCache interface)."""

    def __init__(self, cache: StaticKVCache, slots: torch.Tensor):
        self.cache = cache
        self.slots = slots

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys: (B, G, T, d_queries), values: (B, G, T, d_values), written at the T slots → the layer's whole
        buffers (B, G, S, ...)."""
        cached_keys, cached_values = self.cache.keys[layer], self.cache.values[layer]
        cached_keys.index_copy_(2, self.slots, keys.to(cached_keys.dtype))
        cached_values.index_copy_(2, self.slots, values.to(cached_values.dtype))
        return cached_keys, cached_values
