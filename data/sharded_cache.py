"""A generic cache of items (dicts of tensors, str, int, float, bool) in sharded `.pt` files, and an in-order
process pool to make them. Every `preprocess_*.py` that writes items (audio, images) uses it.

    with ShardedCacheWriter("cached_datasets/speech_train", items_per_shard=256) as writer:
        for item in map_in_workers(make_items, inputs, num_workers=4):   # results in input order
            writer.add(item)
        meta = writer.finish({"source": ...})                            # meta.json, then rename into place
    cache = ShardedCache("cached_datasets/speech_train", made_by="preprocess_vocoder_dataset.py")
    len(cache), cache.meta, cache[7]                                     # cache[i] -> item dict

A cache directory holds `shard-00000.pt`, `shard-00001.pt`, ... (each a `torch.save`d list of up to
`items_per_shard` item dicts, in the order they were added) and `meta.json`:

    format_version, num_items, items_per_shard, shards: [{"file", "items"}], created, and the caller's keys.

The writer works in a temporary directory beside the output (`.NAME.partial-PID`) and renames it into place
at `finish()`: an interrupted run leaves no cache, and an existing cache is replaced only with `overwrite`.
"""

import bisect
import collections
import datetime
import json
import logging
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
RESERVED_META_KEYS = ("format_version", "num_items", "items_per_shard", "shards", "created")
ITEM_VALUE_TYPES = (torch.Tensor, str, int, float, bool)


def shard_file_name(index: int) -> str:
    return f"shard-{index:05d}.pt"


def check_output_dir(output_dir: str | Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless `overwrite` (FileExistsError saying how)."""
    if Path(output_dir).exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; pass --overwrite to replace it")


class ShardedCacheWriter:
    """Writes items to shards of `items_per_shard` in a temporary directory; `finish(meta)` makes it the cache.

    Use it as a context manager: leaving the block with an exception, or without calling `finish`, deletes
    the temporary directory and leaves any existing cache at `output_dir` untouched.
    """

    def __init__(self, output_dir: str | Path, *, items_per_shard: int = 256, overwrite: bool = False):
        if items_per_shard < 1:
            raise ValueError(f"items_per_shard must be at least 1, got {items_per_shard}")
        self.output_dir = Path(output_dir)
        self.items_per_shard, self.overwrite = items_per_shard, overwrite
        check_output_dir(self.output_dir, overwrite)
        self.scratch = self.output_dir.with_name(f".{self.output_dir.name}.partial-{os.getpid()}")
        self.shards: list[dict] = []
        self.num_items = 0
        self._pending: list[dict] = []
        self._state = "new"

    def __enter__(self) -> "ShardedCacheWriter":
        self.output_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir()
        self._state = "open"
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._state == "open":
            if exc_type is None:
                logger.warning("left the ShardedCacheWriter for %s without finish(): nothing was written",
                               self.output_dir)
            shutil.rmtree(self.scratch, ignore_errors=True)
            self._state = "closed"

    def add(self, item: dict) -> None:
        """Append one item: a dict with str keys and tensor/str/int/float/bool values (tensors are stored
        on the CPU, as compact copies when they are views of a larger tensor)."""
        self._require_open("add")
        if not isinstance(item, dict) or not item:
            raise ValueError(f"an item must be a non-empty dict, got {type(item).__name__}")
        stored = {}
        for key, value in item.items():
            if not isinstance(key, str) or not isinstance(value, ITEM_VALUE_TYPES):
                raise ValueError(f"item key {key!r}: keys must be str and values tensor/str/int/float/bool, "
                                 f"got {type(key).__name__} -> {type(value).__name__}")
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu()
                if value.untyped_storage().nbytes() != value.nbytes or not value.is_contiguous():
                    value = value.clone(memory_format=torch.contiguous_format)
            stored[key] = value
        self._pending.append(stored)
        self.num_items += 1
        if len(self._pending) == self.items_per_shard:
            self._write_shard()

    def finish(self, meta: dict) -> dict:
        """Write the last shard and meta.json (the caller's `meta` plus the cache's own keys), then rename the
        temporary directory to `output_dir`. Returns the full meta."""
        self._require_open("finish")
        clash = sorted(set(meta) & set(RESERVED_META_KEYS))
        if clash:
            raise ValueError(f"meta keys {clash} are reserved by the sharded cache")
        if self._pending:
            self._write_shard()
        full_meta = {"format_version": FORMAT_VERSION, "num_items": self.num_items,
                     "items_per_shard": self.items_per_shard, "shards": self.shards,
                     "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **meta}
        (self.scratch / META_FILE).write_text(json.dumps(full_meta, indent=2) + "\n", encoding="utf-8")
        check_output_dir(self.output_dir, self.overwrite)
        _move_into_place(self.scratch, self.output_dir)
        self._state = "finished"
        logger.info("wrote %d items in %d shard(s) to %s", self.num_items, len(self.shards), self.output_dir)
        return full_meta

    def _write_shard(self) -> None:
        name = shard_file_name(len(self.shards))
        torch.save(self._pending, self.scratch / name)
        self.shards.append({"file": name, "items": len(self._pending)})
        self._pending = []

    def _require_open(self, action: str) -> None:
        if self._state != "open":
            raise RuntimeError(f"ShardedCacheWriter.{action}() needs an open writer: use `with "
                               f"ShardedCacheWriter(...) as writer:` and call finish() once (state: {self._state})")


def _move_into_place(scratch: Path, output_dir: Path) -> None:
    """Rename `scratch` to `output_dir`, replacing an existing one (renamed aside first, then deleted)."""
    previous = None
    if output_dir.exists():
        previous = output_dir.with_name(f".{output_dir.name}.replaced-{os.getpid()}")
        shutil.rmtree(previous, ignore_errors=True)
        output_dir.rename(previous)
    scratch.rename(output_dir)
    if previous is not None:
        shutil.rmtree(previous)


class ShardedCache:
    """Reads a cache written by ShardedCacheWriter: `meta`, `len(cache)`, `cache[i]` (an item dict whose
    tensors are fresh copies), iteration in order. A shard is loaded (memory-mapped) when first needed, and
    the `open_shards` most recently used stay loaded: reading in order or within a shard is cheap, while
    random access over many shards re-loads one (its index, ~0.1 s) per miss; since loaded shards are
    memory-mapped, a random-access reader can afford a large `open_shards` (`shard_starts` also allows
    shard-aware sampling).

    `made_by` names the script that writes this kind of cache, for the message when it is missing.
    """

    def __init__(self, directory: str | Path, *, made_by: str = "the matching preprocess_*.py script",
                 open_shards: int = 1):
        if open_shards < 1:
            raise ValueError(f"open_shards must be at least 1, got {open_shards}")
        self.directory, self.open_shards = Path(directory), open_shards
        if not (self.directory / META_FILE).is_file():
            what = "is not a directory" if not self.directory.is_dir() else f"has no {META_FILE} (unfinished?)"
            raise FileNotFoundError(f"no cache at {self.directory}: it {what}; write it with {made_by} "
                                    f"--output_dir {self.directory} (add --overwrite to replace a broken one)")
        try:
            self.meta = json.loads((self.directory / META_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{self.directory / META_FILE} is not valid JSON ({error}); re-run {made_by} "
                             "with --overwrite") from error
        if not isinstance(self.meta, dict) or self.meta.get("format_version") != FORMAT_VERSION:
            found = self.meta.get("format_version") if isinstance(self.meta, dict) else None
            raise ValueError(f"{self.directory} has format_version {found}, not {FORMAT_VERSION}; re-run {made_by} "
                             "with --overwrite")
        sizes = [shard["items"] for shard in self.meta["shards"]]
        missing = [shard["file"] for shard in self.meta["shards"] if not (self.directory / shard["file"]).is_file()]
        if missing or sum(sizes) != self.meta["num_items"]:
            raise ValueError(f"{self.directory} is incomplete (missing shards: {missing or 'none'}, "
                             f"{sum(sizes)} items in shards vs num_items {self.meta['num_items']}); re-run {made_by} "
                             "with --overwrite")
        self.shard_starts = [sum(sizes[:index]) for index in range(len(sizes))]  # first item of each shard
        self._loaded: collections.OrderedDict[int, list[dict]] = collections.OrderedDict()

    def __len__(self) -> int:
        return self.meta["num_items"]

    def __getitem__(self, index: int) -> dict:
        if not isinstance(index, int):
            raise TypeError(f"cache indices are int, got {type(index).__name__}")
        position = index + len(self) if index < 0 else index
        if not 0 <= position < len(self):
            raise IndexError(f"index {index} out of range for a cache of {len(self)} items")
        shard = bisect.bisect_right(self.shard_starts, position) - 1
        item = self._shard(shard)[position - self.shard_starts[shard]]
        return {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in item.items()}

    def __iter__(self) -> Iterator[dict]:
        for index in range(len(self)):
            yield self[index]

    def _shard(self, index: int) -> list[dict]:
        if index in self._loaded:
            self._loaded.move_to_end(index)
        else:
            path = self.directory / self.meta["shards"][index]["file"]
            self._loaded[index] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if len(self._loaded) > self.open_shards:
                self._loaded.popitem(last=False)
        return self._loaded[index]


def map_in_workers(fn: Callable, inputs: Iterable, num_workers: int, *, max_pending: int | None = None) -> Iterator:
    """Yield fn(x) for each x of `inputs`, in input order.

    num_workers 0 or 1 runs in this process. More start that many spawned processes (each limited to one
    torch thread); `fn` and the inputs must be picklable (a module-level function or functools.partial of
    one). At most `max_pending` (default 4 per worker) inputs are in flight, so a long or streamed input
    is never read far ahead. An exception in `fn` is raised here and stops the pool.
    """
    if num_workers < 0:
        raise ValueError(f"--num_workers must be >= 0, got {num_workers}")
    if num_workers <= 1:
        yield from map(fn, inputs)
        return
    max_pending = max_pending or 4 * num_workers
    with multiprocessing.get_context("spawn").Pool(num_workers, initializer=_init_worker) as pool:
        pending = collections.deque()
        for value in inputs:
            pending.append(pool.apply_async(fn, (value,)))
            if len(pending) >= max_pending:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _init_worker() -> None:
    torch.set_num_threads(1)
