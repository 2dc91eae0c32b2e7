"""The on-disk format of a text token cache, shared by its writer and its reader (kept free of torch).

A cache directory holds:

    meta.json            format_version, dtype, vocab_size, eos_token_id, bos_token_id, pad_token_id,
                         tokenizer (the subdirectory), tokenizer_source, source, val_fraction, chars,
                         skipped_documents, created, and
                         splits: {"train": {"shards": [{"file", "tokens"}], "tokens", "documents"}, "val": ...}
    tokenizer/           the tokenizer (save_pretrained), so the cache is self-contained
    train-00000.bin ...  the token ids of each split, packed (doc, EOS, doc, EOS, ...): raw little-endian
    val-00000.bin ...    uint16 when vocab_size <= 65535, else uint32, no header
"""

import numpy as np

FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_SUBDIR = "tokenizer"
SPLITS = ("train", "val")
DTYPES = ("uint16", "uint32")


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 for vocabularies up to 65535 tokens, else uint32."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def shard_file_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"
