"""The generic sharded cache: writing, reading back, atomic replacement, bad input, and the in-order worker pool."""

import json
import time

import pytest
import torch

from data.sharded_cache import ShardedCache, ShardedCacheWriter, map_in_workers


def make_item(index: int) -> dict:
    return {"tensor": torch.arange(index + 1, dtype=torch.float32) * 0.5, "ints": torch.full((2, 3), index),
            "name": f"item-{index}", "count": index, "weight": index / 7, "flag": index % 2 == 0}


def write_cache(directory, count: int, items_per_shard: int, **writer_options) -> dict:
    with ShardedCacheWriter(directory, items_per_shard=items_per_shard, **writer_options) as writer:
        for index in range(count):
            writer.add(make_item(index))
        return writer.finish({"source": {"kind": "test"}, "note": "hello"})


def assert_same_item(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
        else:
            assert type(got[key]) is type(value) and got[key] == value, key


def test_round_trip_across_shards(tmp_path):
    meta = write_cache(tmp_path / "cache", count=7, items_per_shard=3)
    assert [shard["items"] for shard in meta["shards"]] == [3, 3, 1]
    assert meta["num_items"] == 7 and meta["note"] == "hello" and meta["source"] == {"kind": "test"}
    assert json.loads((tmp_path / "cache" / "meta.json").read_text()) == meta
    cache = ShardedCache(tmp_path / "cache")
    assert len(cache) == 7 and cache.meta == meta
    for index in (0, 4, 2, 6, 3, 5, 1):  # out of order: shards reload as needed
        assert_same_item(cache[index], make_item(index))
    assert_same_item(cache[-1], make_item(6))
    assert [item["count"] for item in cache] == list(range(7))
    with pytest.raises(IndexError, match="out of range"):
        cache[7]
    assert sorted(path.name for path in (tmp_path).iterdir()) == ["cache"]  # no temporary directory left


@pytest.mark.parametrize("open_shards, expected_loads", [(1, 4), (2, 2)])
def test_recently_used_shards_stay_loaded(tmp_path, monkeypatch, open_shards, expected_loads):
    write_cache(tmp_path / "cache", count=6, items_per_shard=3)
    cache = ShardedCache(tmp_path / "cache", open_shards=open_shards)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args[0]) or real_load(*args, **kwargs))
    for index in (0, 1, 4, 2, 5, 3):  # shards 0, 0, 1, 0, 1, 1
        assert cache[index]["count"] == index
    assert len(loads) == expected_loads


def test_items_are_copies(tmp_path):
    write_cache(tmp_path / "cache", count=2, items_per_shard=2)
    cache = ShardedCache(tmp_path / "cache")
    cache[1]["tensor"].zero_()
    assert torch.equal(cache[1]["tensor"], make_item(1)["tensor"])


def test_views_are_stored_compactly(tmp_path):
    big = torch.randn(1_000_000)
    with ShardedCacheWriter(tmp_path / "cache") as writer:
        writer.add({"piece": big[10:20], "strided": big[:40:2]})
        writer.finish({})
    assert (tmp_path / "cache" / "shard-00000.pt").stat().st_size < 20_000  # not the 4 MB storage
    item = ShardedCache(tmp_path / "cache")[0]
    assert torch.equal(item["piece"], big[10:20]) and torch.equal(item["strided"], big[:40:2])


def test_error_inside_the_block_leaves_nothing_and_keeps_the_old_cache(tmp_path):
    write_cache(tmp_path / "cache", count=2, items_per_shard=4)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardedCacheWriter(tmp_path / "cache", items_per_shard=1, overwrite=True) as writer:
            writer.add(make_item(5))
            writer.add(make_item(6))  # a shard file exists in the temporary directory by now
            raise RuntimeError("boom")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache"]
    cache = ShardedCache(tmp_path / "cache")
    assert len(cache) == 2 and cache[1]["count"] == 1


def test_leaving_without_finish_writes_nothing(tmp_path):
    with ShardedCacheWriter(tmp_path / "cache") as writer:
        writer.add(make_item(0))
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    write_cache(tmp_path / "cache", count=3, items_per_shard=2)
    with pytest.raises(FileExistsError, match="--overwrite"):
        ShardedCacheWriter(tmp_path / "cache")
    write_cache(tmp_path / "cache", count=1, items_per_shard=2, overwrite=True)
    assert len(ShardedCache(tmp_path / "cache")) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache"]


def test_bad_items_and_misuse(tmp_path):
    with ShardedCacheWriter(tmp_path / "cache") as writer:
        for bad in ({}, {"a": [1, 2]}, {1: torch.zeros(1)}, {"a": None}, [("a", 1)]):
            with pytest.raises(ValueError, match="item"):
                writer.add(bad)
        writer.add(make_item(0))
        with pytest.raises(ValueError, match="reserved"):
            writer.finish({"num_items": 5})
        writer.finish({})
        with pytest.raises(RuntimeError, match="finish"):
            writer.add(make_item(1))
    with pytest.raises(RuntimeError, match="with ShardedCacheWriter"):
        ShardedCacheWriter(tmp_path / "other").add(make_item(0))
    with pytest.raises(ValueError, match="items_per_shard"):
        ShardedCacheWriter(tmp_path / "other", items_per_shard=0)


def test_missing_or_broken_cache_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocess_vocoder_dataset.py --output_dir .*nowhere"):
        ShardedCache(tmp_path / "nowhere", made_by="preprocess_vocoder_dataset.py")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        ShardedCache(tmp_path / "empty")
    write_cache(tmp_path / "cache", count=5, items_per_shard=2)
    (tmp_path / "cache" / "shard-00001.pt").unlink()
    with pytest.raises(ValueError, match="shard-00001.pt"):
        ShardedCache(tmp_path / "cache")
    (tmp_path / "cache" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ShardedCache(tmp_path / "cache")


def slow_square(value: int) -> int:
    """Later inputs finish first, so only an ordered pool returns them in input order."""
    time.sleep(0.02 * (5 - value % 5))
    if value < 0:
        raise ValueError(f"negative input {value}")
    return value * value


def test_map_in_workers_keeps_input_order_and_reads_ahead_little():
    consumed = []

    def inputs():
        for value in range(12):
            consumed.append(value)
            yield value

    results = map_in_workers(slow_square, inputs(), num_workers=2, max_pending=3)
    first = next(results)
    assert first == 0 and len(consumed) <= 3  # a bounded read-ahead, unlike Pool.imap
    assert [first, *results] == [value * value for value in range(12)]
    assert list(map_in_workers(slow_square, range(6), num_workers=0)) == [value * value for value in range(6)]


def test_map_in_workers_raises_worker_errors():
    with pytest.raises(ValueError, match="negative input -1"):
        list(map_in_workers(slow_square, [1, 2, -1, 3], num_workers=2))
    with pytest.raises(ValueError, match="num_workers"):
        list(map_in_workers(slow_square, [1], num_workers=-1))
