"""Write a text token cache: documents -> token ids, EOS after each document -> sharded raw binary files.

    meta = write_text_cache(source.documents(), tokenizer, "cached_datasets/text", source=source.describe(),
                            tokenizer_source={"name_or_path": "gpt2"})

The layout is described in `data/text_cache_format.py`.

A document goes to val when a hash of its text falls below `val_fraction` (and the first document goes to
val while val has none, so val is never empty): the splits are disjoint, and the same corpus always splits
the same way. Writing streams (batches of documents are tokenised and appended to shard files) into a
temporary directory next to the output (`.NAME.partial-PID`), renamed into place at the end: an interrupted
run leaves no cache.
"""

import datetime
import hashlib
import itertools
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from data.text_cache_format import (FORMAT_VERSION, META_FILE, SPLITS, TOKENIZER_SUBDIR, shard_file_name,
                                    token_dtype)
from data.tokenizer import DocumentEncoder, special_token_ids

logger = logging.getLogger(__name__)

BATCH_DOCUMENTS = 1024
BATCH_CHARS = 4_000_000


def write_text_cache(documents: Iterable[str], tokenizer: PreTrainedTokenizerBase, output_dir: str | Path, *,
                     source: dict, tokenizer_source: dict, val_fraction: float = 0.01,
                     shard_tokens: int = 50_000_000, overwrite: bool = False) -> dict:
    """Tokenise `documents` into a cache at `output_dir` and return its meta (also in meta.json).

    Empty documents are skipped (counted in meta["skipped_documents"]). Raises FileExistsError if
    `output_dir` exists and not `overwrite`, ValueError if the corpus leaves the train split empty.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if shard_tokens <= 0:
        raise ValueError(f"--shard_tokens must be positive, got {shard_tokens}")
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = output_dir.with_name(f".{output_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        tokenizer.save_pretrained(scratch / TOKENIZER_SUBDIR)
        special = special_token_ids(tokenizer)
        vocab_size = len(tokenizer)
        dtype = token_dtype(vocab_size)
        stats = _write_splits(documents, DocumentEncoder(tokenizer), special["eos_token_id"], dtype, scratch,
                              val_fraction, shard_tokens)
        meta = {"format_version": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": vocab_size, **special,
                "tokenizer": TOKENIZER_SUBDIR, "tokenizer_source": tokenizer_source, "source": source,
                "val_fraction": val_fraction, **stats,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        (scratch / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        check_output_dir(output_dir, overwrite)
        _move_into_place(scratch, output_dir)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    logger.info("wrote %s: %s", output_dir, {split: meta["splits"][split]["tokens"] for split in SPLITS})
    return meta


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse to replace an existing cache unless `overwrite`."""
    if Path(output_dir).exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; pass --overwrite to replace it")


def _write_splits(documents: Iterable[str], encode: DocumentEncoder, eos: int, dtype: np.dtype, directory: Path,
                  val_fraction: float, shard_tokens: int) -> dict:
    writers = {split: _ShardWriter(directory, split, dtype, shard_tokens) for split in SPLITS}
    counts = {split: 0 for split in SPLITS}
    chars = skipped = 0
    try:
        for batch in _batches(documents):
            texts = [text for text in batch if text.strip()]
            skipped += len(batch) - len(texts)
            chars += sum(len(text) for text in texts)
            ids_by_split = {split: [] for split in SPLITS}
            for text, ids in zip(texts, encode(texts)):
                split = "val" if counts["val"] == 0 or _hash_fraction(text) < val_fraction else "train"
                ids.append(eos)
                ids_by_split[split].append(ids)
                counts[split] += 1
            for split, id_lists in ids_by_split.items():
                if id_lists:
                    writers[split].write(np.fromiter(itertools.chain.from_iterable(id_lists), dtype=dtype))
    finally:
        for writer in writers.values():
            writer.close()
    if counts["train"] == 0:
        raise ValueError(f"the source gave {counts['val']} non-empty document(s) and {skipped} empty one(s): not "
                         "enough for both a train and a val split; give it more documents")
    splits = {}
    for split, writer in writers.items():
        shards = writer.shards
        splits[split] = {"shards": shards, "tokens": sum(shard["tokens"] for shard in shards),
                         "documents": counts[split]}
    return {"splits": splits, "chars": chars, "skipped_documents": skipped}


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    """Lists of up to BATCH_DOCUMENTS documents and (unless one document is longer) BATCH_CHARS characters."""
    batch, chars = [], 0
    for document in documents:
        batch.append(document)
        chars += len(document)
        if len(batch) >= BATCH_DOCUMENTS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _hash_fraction(text: str) -> float:
    """A number in [0, 1) fixed by the text: the first 8 bytes of its BLAKE2b hash."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _move_into_place(scratch: Path, output_dir: Path) -> None:
    """Rename `scratch` to `output_dir`, replacing an existing one (renamed aside first, then deleted)."""
    previous = None
    if output_dir.exists():
        previous = output_dir.with_name(f".{output_dir.name}.replaced-{os.getpid()}")
        output_dir.rename(previous)
    scratch.rename(output_dir)
    if previous is not None:
        shutil.rmtree(previous)


class _ShardWriter:
    """Appends token ids of one split to `{split}-00000.bin`, `{split}-00001.bin`, ... of `shard_tokens`
    tokens each (the last one shorter). A shard file is created only when it gets its first token."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None

    def write(self, ids: np.ndarray) -> None:
        """ids: (n,) of self.dtype."""
        while len(ids):
            if self.file is None:
                name = shard_file_name(self.split, len(self.shards))
                self.file = open(self.directory / name, "wb")
                self.shards.append({"file": name, "tokens": 0})
            shard = self.shards[-1]
            piece = ids[:self.shard_tokens - shard["tokens"]]
            self.file.write(piece.tobytes())
            shard["tokens"] += len(piece)
            ids = ids[len(piece):]
            if shard["tokens"] == self.shard_tokens:
                self.close()

    def close(self) -> list[dict]:
        """Close the open shard file; returns [{"file": name, "tokens": n}, ...]."""
        if self.file is not None:
            self.file.close()
            self.file = None
        return self.shards
