"""Data pipelines: document sources, tokenizers, and the sharded token caches that training reads.

Text: `preprocess_text_dataset.py` writes a cache with `text_cache_writer.write_text_cache`;
training reads it with `text_cache.TextTokenCache` and batches it with `text_cache.PackedBatches`.

This file stays import-light (no torch): `builtin_text` runs part of its work in a spawned process
that imports this package.
"""
