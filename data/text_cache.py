"""Read a text token cache (written by `preprocess_text_dataset.py`) and cut it into training batches.

    cache = TextTokenCache("cached_datasets/text")
    train = cache.tokens("train")               # (N,) token ids: np.memmap, or ShardedTokens for several shards
    batches = PackedBatches(train, seq_len=1024, batch_size=8, seed=0, rank=rank, world_size=world_size)
    input_ids = batches.batch(step)             # (8, 1024) int64; labels = input_ids (the model shifts)
    val_batches = evaluation_batches(cache.tokens("val"), seq_len=1024, batch_size=8, max_batches=20)

The cache layout is described in `data/text_cache_format.py`. Documents are packed with EOS after each,
so a window may span documents; that is the usual GPT-style pretraining setup.
"""

import json
import operator
from pathlib import Path

import numpy as np
import torch

from data.text_cache_format import DTYPES, FORMAT_VERSION, META_FILE

META_KEYS = ("format_version", "dtype", "vocab_size", "eos_token_id", "pad_token_id", "bos_token_id", "tokenizer",
             "splits")


class TextTokenCache:
    """A validated text cache directory: `meta` (dict from meta.json), `vocab_size`, `eos_token_id`,
    `pad_token_id`, `bos_token_id`, `splits` (names), and the token ids of each split."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        rerun = f"python preprocess_text_dataset.py --dataset_name builtin:text --output_dir {self.cache_dir}"
        if not self.cache_dir.is_dir():
            raise FileNotFoundError(f"no text cache at {self.cache_dir}; create one with: {rerun} "
                                    "(or another source: see python preprocess_text_dataset.py --help)")
        self.meta = _read_meta(self.cache_dir / META_FILE, rerun)
        self.vocab_size = self.meta["vocab_size"]
        self.eos_token_id = self.meta["eos_token_id"]
        self.pad_token_id = self.meta["pad_token_id"]
        self.bos_token_id = self.meta["bos_token_id"]
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        for split in self.splits:
            for shard in self._split(split)["shards"]:
                path = self.cache_dir / shard["file"]
                expected = shard["tokens"] * self.dtype.itemsize
                size = path.stat().st_size if path.is_file() else None
                if size != expected:
                    found = "is missing" if size is None else f"has {size} bytes"
                    raise ValueError(f"shard {path} {found}, but meta.json says {shard['tokens']} tokens "
                                     f"({expected} bytes): the cache is truncated or corrupt; re-run "
                                     f"preprocessing with --overwrite, e.g. {rerun} --overwrite")

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def num_tokens(self, split: str) -> int:
        return self._split(split)["tokens"]

    def tokens(self, split: str) -> "np.ndarray | ShardedTokens":
        """All token ids of `split`, (N,), memory-mapped (nothing is read until sliced)."""
        shards = [np.memmap(self.cache_dir / shard["file"], dtype=self.dtype, mode="r")
                  for shard in self._split(split)["shards"] if shard["tokens"] > 0]
        if not shards:
            return np.empty(0, dtype=self.dtype)
        return shards[0] if len(shards) == 1 else ShardedTokens(shards)

    def load_tokenizer(self):
        """The tokenizer saved in the cache (a `transformers` fast tokenizer)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.cache_dir / self.meta["tokenizer"])

    def _split(self, split: str) -> dict:
        if split not in self.meta["splits"]:
            raise ValueError(f"unknown split {split!r} in {self.cache_dir}; available: {', '.join(self.splits)}")
        return self.meta["splits"][split]


def _read_meta(path: Path, rerun: str) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ValueError(f"{path} is missing, so {path.parent} is not a finished text cache; re-run "
                         f"preprocessing with --overwrite, e.g. {rerun} --overwrite") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-run preprocessing with --overwrite") from error
    missing = [key for key in META_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; it was not written by preprocess_text_dataset.py")
    if meta["format_version"] != FORMAT_VERSION or meta["dtype"] not in DTYPES:
        raise ValueError(f"{path}: format_version {meta['format_version']} with dtype {meta['dtype']!r} is not "
                         f"format_version {FORMAT_VERSION} with one of {DTYPES}; re-run preprocessing")
    return meta


class ShardedTokens:
    """Several shards seen as one (N,) array: `len()`, `[i]` and contiguous `[a:b]` across shard boundaries
    (a slice reads only the shards it touches)."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.dtype = shards[0].dtype
        self.offsets = np.cumsum([0] + [len(shard) for shard in shards])  # (num_shards + 1,)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("ShardedTokens supports only contiguous slices [a:b]")
            pieces = []
            shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
            while start < stop:
                base = int(self.offsets[shard])
                end = min(stop, int(self.offsets[shard + 1]))
                pieces.append(self.shards[shard][start - base:end - base])
                start, shard = end, shard + 1
            if not pieces:
                return np.empty(0, dtype=self.dtype)
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        position = operator.index(index)
        position += len(self) if position < 0 else 0
        if not 0 <= position < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} tokens")
        shard = int(np.searchsorted(self.offsets, position, side="right")) - 1
        return self.shards[shard][position - int(self.offsets[shard])]


class PackedBatches:
    """Shuffled training batches of non-overlapping `seq_len`-token windows of a packed token stream.

    Window k is tokens[k * seq_len:(k + 1) * seq_len]; num_windows = len(tokens) // seq_len. Epoch e visits
    the windows in the order of a permutation drawn from numpy's default_rng(seed + e). Global micro-batch i
    takes positions [i * B * W, (i + 1) * B * W) of the concatenated epoch orders (B = batch_size,
    W = world_size; an epoch is num_windows // (B * W) batches, the leftover windows of each epoch are
    dropped), and rank r takes the r-th B of those. So `batch(i)` depends only on i: resuming needs
    only the batch counter, and the ranks of one step never share a window.
    """

    def __init__(self, tokens, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_windows = len(tokens) // seq_len
        windows_per_step = batch_size * world_size
        if self.num_windows < windows_per_step:
            raise ValueError(f"{len(tokens)} tokens make {self.num_windows} windows of seq_len={seq_len}, fewer than "
                             f"batch_size * world_size = {windows_per_step}: at least {windows_per_step * seq_len} "
                             "tokens are needed; preprocess more text or lower the batch size or sequence length")
        self._epoch, self._order = None, None

    @property
    def batches_per_epoch(self) -> int:
        return self.num_windows // (self.batch_size * self.world_size)

    def window_indices(self, i: int) -> np.ndarray:
        """Indices of the windows of this rank's micro-batch i: (batch_size,)."""
        if i < 0:
            raise ValueError(f"batch index must be >= 0, got {i}")
        epoch, step = divmod(i, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng(self.seed + epoch).permutation(self.num_windows)
        start = (step * self.world_size + self.rank) * self.batch_size
        return self._order[start:start + self.batch_size]

    def batch(self, i: int) -> torch.Tensor:
        """This rank's micro-batch i: input_ids (batch_size, seq_len), int64."""
        windows = [np.asarray(self.tokens[k * self.seq_len:(k + 1) * self.seq_len]) for k in self.window_indices(i)]
        return torch.from_numpy(np.stack(windows).astype(np.int64))


def evaluation_batches(tokens, seq_len: int, batch_size: int, max_batches: int | None) -> list[torch.Tensor]:
    """Sequential non-overlapping windows from the start of `tokens` (the val split): up to `max_batches`
    batches (None: all) of (batch_size, seq_len) int64; the last batch may be smaller."""
    num_windows = len(tokens) // seq_len
    if num_windows == 0:
        raise ValueError(f"the validation split has {len(tokens)} tokens, fewer than one window of seq_len={seq_len}; "
                         "preprocess more text, raise --val_fraction, or lower the sequence length")
    if max_batches is not None:
        num_windows = min(num_windows, max_batches * batch_size)
    windows = np.asarray(tokens[:num_windows * seq_len]).astype(np.int64).reshape(num_windows, seq_len)
    return [torch.from_numpy(windows[start:start + batch_size]) for start in range(0, num_windows, batch_size)]
