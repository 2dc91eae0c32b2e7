"""Media spans of a batch and the KV cache that remembers which cached positions form bidirectional spans.

    spans = MediaSpans(latents, timesteps, rows, starts)   # M spans of one kind in a (B, T) batch of positions
    cache = SpanKVCache()                                   # model(..., past_key_values=cache, use_cache=True)
    cache.rollback(length)                                  # forget everything after `length` positions
"""

from dataclasses import dataclass
from typing import Optional

import torch

from model.transformer.attention import KVCache


@dataclass
class MediaSpans:
    """M spans of one media kind. latents: (M, ...) noisy (or clean) latents, e.g. (M, C, h, w) for images;
    timesteps: (M,) float on the 0..num_train_timesteps scale (0 for clean media); rows: (M,) long, the batch row
    of each span; starts: (M,) long, the position of its first latent position within the T new positions (the
    position right after its begin token); condition: (M, D) the spans' conditioning vectors (audio: speaker
embeddings) or None."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    rows: torch.Tensor
    starts: torch.Tensor
    condition: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.latents.shape[0]

    def positions(self, n_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, columns), each (M, n_positions) long: the batch row and sequence position of every latent
        position of every span."""
        offsets = torch.arange(n_positions, device=self.starts.device)
        return self.rows[:, None].expand(-1, n_positions), self.starts[:, None] + offsets[None]


class SpanKVCache(KVCache):
    """A KVCache that also keeps the span ids (B, cached length) of the cached positions (0 = causal position),
    so later queries keep the spans bidirectional, and can roll every layer back to an earlier length (the
    denoising steps of a span are run against the prefix and then forgotten)."""

    def __init__(self):
        super().__init__()
        self.span_ids = None

    def extend_span_ids(self, new_ids: torch.Tensor) -> torch.Tensor:
        """Append new_ids (B, T) → all span ids (B, cached + T)."""
        self.span_ids = new_ids if self.span_ids is None else torch.cat((self.span_ids, new_ids), dim=1)
        return self.span_ids

    def next_span_id(self) -> int:
        """A span id not used by any cached position."""
        return 1 if self.span_ids is None or self.span_ids.numel() == 0 else int(self.span_ids.max()) + 1

    def rollback(self, length: int) -> None:
        """Forget every position from `length` on, in every layer."""
        for layer in list(self._lengths):
            self.truncate(layer, length)
        if self.span_ids is not None:
            self.span_ids = self.span_ids[:, :length]
