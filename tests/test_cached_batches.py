"""CachedBatches and fixed_items (data/cached_batches.py): batches that are a pure function of their index
(exact resume), disjoint per-rank slices, every item once per epoch, a new order each epoch, shard-local reads,
and clear errors."""

import pytest
import torch

import data.sharded_cache
from data.cached_batches import CachedBatches, fixed_items
from data.sharded_cache import ShardedCache, ShardedCacheWriter

NUM_ITEMS, ITEMS_PER_SHARD = 48, 8  # 6 shards


def collate(items: list[dict]) -> dict:
    return {"index": torch.tensor([item["index"] for item in items]), "x": torch.stack([item["x"] for item in items])}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Items {"index": i, "x": (2,) float tensor [i, -i]} in shards of ITEMS_PER_SHARD."""
    directory = tmp_path_factory.mktemp("cached_batches") / "cache"
    with ShardedCacheWriter(directory, items_per_shard=ITEMS_PER_SHARD) as writer:
        for index in range(NUM_ITEMS):
            writer.add({"index": index, "x": torch.tensor([float(index), -float(index)])})
        writer.finish({"made_by": "test"})
    return directory


def open_cache(cache_dir, open_shards: int = 2) -> ShardedCache:
    return ShardedCache(cache_dir, open_shards=open_shards)


def batches(cache_dir, batch_size=4, seed=0, rank=0, world_size=1, **kwargs) -> CachedBatches:
    return CachedBatches(open_cache(cache_dir), batch_size, seed, rank, world_size, collate, **kwargs)


def epoch_indices(sampler: CachedBatches, epoch: int) -> list[list[int]]:
    first = epoch * sampler.batches_per_epoch
    return [sampler.batch(i)["index"].tolist() for i in range(first, first + sampler.batches_per_epoch)]


def test_collate_receives_the_cache_items(cache_dir):
    batch = batches(cache_dir).batch(0)
    assert batch["index"].shape == (4,) and batch["x"].shape == (4, 2)
    assert torch.equal(batch["x"][:, 0], batch["index"].float())  # each row is its own item
    assert torch.equal(batch["x"][:, 1], -batch["index"].float())


def test_same_index_same_batch_in_any_order_and_instance(cache_dir):
    """A pure function of i: a fresh sampler (a resumed run) asked for batch 13 first gives what a sampler that
    walked through 0..20 gave."""
    walked = batches(cache_dir, seed=3)
    sequence = [walked.batch(i)["index"].tolist() for i in range(21)]
    resumed = batches(cache_dir, seed=3)
    assert resumed.batch(13)["index"].tolist() == sequence[13]
    assert [resumed.batch(i)["index"].tolist() for i in (20, 2, 13, 7)] == [sequence[i] for i in (20, 2, 13, 7)]


def test_every_item_once_per_epoch_in_a_new_order(cache_dir):
    sampler = batches(cache_dir, batch_size=4, seed=1)
    assert sampler.batches_per_epoch == NUM_ITEMS // 4
    orders = [sum(epoch_indices(sampler, epoch), []) for epoch in range(3)]
    for order in orders:
        assert sorted(order) == list(range(NUM_ITEMS))
    assert orders[0] != orders[1] and orders[1] != orders[2]
    assert orders[0] != list(range(NUM_ITEMS))  # shuffled, not in cache order
    assert sum(epoch_indices(batches(cache_dir, batch_size=4, seed=2), 0), []) != orders[0]  # the seed matters


def test_ranks_take_disjoint_slices(cache_dir):
    """3 ranks x batch 4 = 12 items per global batch: 4 global batches per epoch, covering all 48 items."""
    ranks = [batches(cache_dir, batch_size=4, seed=5, rank=rank, world_size=3) for rank in range(3)]
    assert ranks[0].batches_per_epoch == 4
    for epoch in range(2):
        per_rank = [epoch_indices(sampler, epoch) for sampler in ranks]
        for i in range(4):
            global_batch = [index for rank in range(3) for index in per_rank[rank][i]]
            assert len(set(global_batch)) == 12
        everything = [index for rank_batches in per_rank for batch in rank_batches for index in batch]
        assert sorted(everything) == list(range(NUM_ITEMS))
    # the ranks together read what one rank with the global batch size reads
    single = batches(cache_dir, batch_size=12, seed=5)
    assert [sorted(index for sampler in ranks for index in sampler.batch(i)["index"].tolist()) for i in range(4)] == \
        [sorted(single.batch(i)["index"].tolist()) for i in range(4)]


def test_leftover_items_are_dropped_for_that_epoch_only(cache_dir):
    sampler = batches(cache_dir, batch_size=5, seed=0)  # 48 = 9 x 5 + 3
    assert sampler.batches_per_epoch == 9
    seen = [set(sum(epoch_indices(sampler, epoch), [])) for epoch in range(4)]
    assert all(len(items) == 45 for items in seen)
    assert set().union(*seen) == set(range(NUM_ITEMS))  # the dropped three differ between epochs


def shard_of(index: int) -> int:
    return index // ITEMS_PER_SHARD


def test_batches_stay_within_a_window_of_shards(cache_dir):
    sampler = batches(cache_dir, batch_size=4, seed=0, shard_window=2)
    for i in range(2 * sampler.batches_per_epoch):
        shards = {shard_of(index) for index in sampler.batch(i)["index"].tolist()}
        assert len(shards) <= 4  # one window of 2, or the end of one and the start of the next
    # within one window the items of its shards are mixed: windows are not read shard by shard
    order = sampler.epoch_order(0).tolist()
    first_window = order[:2 * ITEMS_PER_SHARD]
    assert len({shard_of(index) for index in first_window}) == 2
    assert [shard_of(index) for index in first_window] != sorted(shard_of(index) for index in first_window)


def test_an_epoch_loads_each_shard_once(cache_dir, monkeypatch):
    """With open_shards >= shard_window (the default window), reading a whole epoch loads every shard exactly
    once, where reading a random permutation would reload shards over and over."""
    loads = []
    real_load = torch.load

    def counting_load(path, **kwargs):
        loads.append(path)
        return real_load(path, **kwargs)

    monkeypatch.setattr(data.sharded_cache.torch, "load", counting_load)
    sampler = CachedBatches(open_cache(cache_dir, open_shards=2), 4, 0, 0, 1, collate)
    assert sampler.shard_window == 2
    epoch_indices(sampler, 0)
    assert len(loads) == NUM_ITEMS // ITEMS_PER_SHARD and len(set(loads)) == len(loads)

    loads.clear()
    cache = open_cache(cache_dir, open_shards=2)
    for index in torch.randperm(NUM_ITEMS, generator=torch.Generator().manual_seed(0)).tolist():
        cache[index]
    assert len(loads) > 2 * NUM_ITEMS // ITEMS_PER_SHARD


def test_fixed_items_are_spread_and_stable(cache_dir):
    cache = open_cache(cache_dir)
    items = fixed_items(cache, 6)
    assert [item["index"] for item in items] == [0, 8, 16, 24, 32, 40]
    assert [item["index"] for item in fixed_items(open_cache(cache_dir), 6)] == [0, 8, 16, 24, 32, 40]
    assert [item["index"] for item in fixed_items(cache, 1000)] == list(range(NUM_ITEMS))
    with pytest.raises(ValueError, match="at least one item"):
        fixed_items(cache, 0)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 25, "world_size": 2}, "holds 48 items, fewer than one global batch.*--batch_size 25 x 2"),
    ({"batch_size": 0}, "batch_size >= 1"),
    ({"rank": 2, "world_size": 2}, "0 <= rank < world_size"),
    ({"shard_window": -1}, "shard_window must be at least 1"),
])
def test_bad_arguments(cache_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        batches(cache_dir, **kwargs)


def test_negative_batch_index(cache_dir):
    with pytest.raises(ValueError, match="non-negative"):
        batches(cache_dir).batch(-1)
