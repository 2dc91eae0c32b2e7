"""Resumable, shard-aware batches from any ShardedCache (data/sharded_cache.py), for every pretrain_*.py that
reads one (images, audio).

    cache = ShardedCache("cached_datasets/image_train_cached", open_shards=8)
    train = CachedBatches(cache, batch_size=8, seed=42, rank=0, world_size=1, collate=stack_images)
    batch = train.batch(i)                 # a pure function of i: a resumed run reads the same batches
    val = fixed_items(val_cache, 160)      # the same 160 items every time, for evaluation

Order: epoch e = i // batches_per_epoch is a permutation seeded by (seed, e). It shuffles the shards, groups them
into windows of `shard_window` consecutive (shuffled) shards and shuffles the items inside each window, so a batch
reads from at most a window's shards (plus the next window's, at a boundary) and a cache with open_shards >=
shard_window loads each shard about once per epoch (a shard load is ~0.1 s). Each global batch of
batch_size * world_size items is split into disjoint, contiguous per-rank slices; the items left over at the end
of an epoch (fewer than a global batch) are dropped for that epoch only.
"""

import logging
from collections.abc import Callable

import torch

from data.sharded_cache import ShardedCache

logger = logging.getLogger(__name__)


class CachedBatches:
    """Micro-batches of `batch_size` items for `rank` of `world_size`; `collate(list of item dicts) -> batch`.

    shard_window: shards whose items are mixed together (default: the cache's open_shards, so that a window
    stays loaded). Raises ValueError when the cache holds fewer items than one global batch."""

    def __init__(self, cache: ShardedCache, batch_size: int, seed: int, rank: int, world_size: int,
                 collate: Callable[[list[dict]], dict], shard_window: int | None = None):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size={batch_size}, "
                             f"rank={rank}, world_size={world_size}")
        self.shard_window = shard_window or cache.open_shards
        if self.shard_window < 1:
            raise ValueError(f"shard_window must be at least 1, got {self.shard_window}")
        global_batch = batch_size * world_size
        if len(cache) < global_batch:
            raise ValueError(f"{cache.directory} holds {len(cache)} items, fewer than one global batch "
                             f"(--batch_size {batch_size} x {world_size} rank(s) = {global_batch}): lower "
                             "--batch_size or write a larger cache")
        self.cache, self.batch_size, self.seed = cache, batch_size, seed
        self.rank, self.world_size, self.collate = rank, world_size, collate
        self.batches_per_epoch = len(cache) // global_batch
        self._shard_ranges = [range(start, start + shard["items"])
                              for start, shard in zip(cache.shard_starts, cache.meta["shards"])]
        self._order_epoch, self._order = None, None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Every item index of the cache once, in the order of `epoch`: (len(cache),) int64."""
        if epoch != self._order_epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            shards = torch.randperm(len(self._shard_ranges), generator=generator).tolist()
            windows = []
            for first in range(0, len(shards), self.shard_window):
                items = torch.cat([torch.arange(r.start, r.stop) for r in
                                   (self._shard_ranges[s] for s in shards[first:first + self.shard_window])])
                windows.append(items[torch.randperm(len(items), generator=generator)])
            self._order_epoch, self._order = epoch, torch.cat(windows)
        return self._order

    def indices(self, i: int) -> list[int]:
        """The cache indices of this rank's micro-batch i (i >= 0)."""
        if i < 0:
            raise ValueError(f"batch index must be non-negative, got {i}")
        epoch, within = divmod(i, self.batches_per_epoch)
        start = (within * self.world_size + self.rank) * self.batch_size
        return self.epoch_order(epoch)[start:start + self.batch_size].tolist()

    def batch(self, i: int) -> dict:
        """collate([cache[index] for this rank's micro-batch i]); a pure function of i."""
        return self.collate([self.cache[index] for index in self.indices(i)])


def fixed_items(cache: ShardedCache, n: int) -> list[dict]:
    """min(n, len(cache)) items spread evenly over the cache (index k * len // n), in cache order, so that
    each shard is loaded at most once; the same items on every call and every rank."""
    if n < 1:
        raise ValueError(f"need at least one item, got n={n}")
    count = min(n, len(cache))
    return [cache[k * len(cache) // count] for k in range(count)]
