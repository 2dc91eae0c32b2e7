"""Tokenise a text corpus into a sharded token cache (train and val splits) for pretrain_wm.py.

    python preprocess_text_dataset.py --dataset_name builtin:text            # no download; trains a BPE tokenizer
    python preprocess_text_dataset.py --input_dir my_texts --train_tokenizer --vocab_size 16384 \\
        --output_dir cached_datasets/my_texts
    python preprocess_text_dataset.py --from_disk my_saved_dataset --tokenizer path/to/saved_tokenizer
    python preprocess_text_dataset.py --dataset_name wikitext --dataset_config wikitext-103-raw-v1 --tokenizer gpt2

Sources: a Hugging Face dataset (streamed; needs the hub), local .txt/.jsonl/.parquet files, a dataset saved
with `save_to_disk`, or `builtin:text` (documentation installed with Python and numpy, ~4.7 M characters;
see data/builtin_text.py). The cache (layout in data/text_cache_format.py) holds the token ids of a train
and a val split, the tokenizer, and meta.json; training reads it with data.text_cache.TextTokenCache.
"""

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from data.builtin_text import BUILTIN_TEXT_NAME
from data.cli import run_preprocessing
from data.text_cache_writer import check_output_dir, write_text_cache
from data.text_sources import TextSource
from data.tokenizer import load_tokenizer, train_bpe_tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset_name", help=f"Hugging Face dataset name, or {BUILTIN_TEXT_NAME} (no download)")
    source.add_argument("--input_dir", help="folder of .txt/.jsonl/.parquet files (recursive); a .txt file is one "
                                            "document")
    source.add_argument("--input_files", nargs="+", metavar="GLOB", help="files or glob patterns (** recurses)")
    source.add_argument("--from_disk", metavar="DIR", help="a dataset saved with datasets' save_to_disk")
    parser.add_argument("--dataset_config", help="Hugging Face dataset config name")
    parser.add_argument("--split", default="train",
                        help="split of a hub or saved dataset to read (val = validation); the cache always gets "
                             "its own train and val splits (see --val_fraction)")
    parser.add_argument("--text_column", default="text", help="text field of .jsonl/.parquet/dataset rows")
    parser.add_argument("--max_documents", type=int, help="read at most this many documents")
    parser.add_argument("--max_chars", type=int, help="read at most this many characters")
    parser.add_argument("--val_fraction", type=float, default=0.01,
                        help="fraction of documents (chosen by a hash of their text) for the val split; val gets "
                             "at least one document")
    tokenizer = parser.add_mutually_exclusive_group()
    tokenizer.add_argument("--tokenizer", metavar="NAME_OR_PATH", help="Hugging Face tokenizer name or local path")
    tokenizer.add_argument("--train_tokenizer", action="store_true",
                           help=f"train a byte-level BPE on the corpus (default for {BUILTIN_TEXT_NAME})")
    parser.add_argument("--vocab_size", type=int, default=8192, help="vocabulary size for --train_tokenizer")
    parser.add_argument("--output_dir", default="cached_datasets/text")
    parser.add_argument("--shard_tokens", type=int, default=50_000_000, help="tokens per shard file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cache at --output_dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_preprocessing(argv, build_parser(), write, print_summary)


def write(args) -> tuple[dict, float]:
    """Tokenise the source into args.output_dir; returns meta.json's contents and the seconds the tokenizer took."""
    started = time.perf_counter()
    source = TextSource(dataset_name=args.dataset_name, dataset_config=args.dataset_config, split=args.split,
                        input_dir=args.input_dir, input_files=tuple(args.input_files or ()) or None,
                        from_disk=args.from_disk, text_column=args.text_column,
                        max_documents=args.max_documents, max_chars=args.max_chars)
    check_output_dir(Path(args.output_dir), args.overwrite)
    tokenizer, tokenizer_source = _get_tokenizer(args, source)
    tokenizer_seconds = time.perf_counter() - started
    with tqdm(source.documents(), desc="tokenising", unit=" docs") as documents:
        meta = write_text_cache(documents, tokenizer, args.output_dir, source=source.describe(),
                                tokenizer_source=tokenizer_source, val_fraction=args.val_fraction,
                                shard_tokens=args.shard_tokens, overwrite=args.overwrite)
    return meta, tokenizer_seconds


def _get_tokenizer(args, source: TextSource):
    """The tokenizer to use and a description of where it came from (for meta.json)."""
    if args.tokenizer:
        return load_tokenizer(args.tokenizer), {"name_or_path": args.tokenizer}
    if not (args.train_tokenizer or source.kind == "builtin"):
        raise ValueError("give --tokenizer NAME_OR_PATH or --train_tokenizer (with --vocab_size N)")
    with tqdm(source.documents(), desc="training tokenizer", unit=" docs") as documents:
        tokenizer = train_bpe_tokenizer(documents, args.vocab_size)
    return tokenizer, {"trained": "byte-level BPE", "vocab_size_requested": args.vocab_size}


def print_summary(result: tuple[dict, float], args, total_seconds: float) -> None:
    (meta, tokenizer_seconds), output_dir = result, args.output_dir
    splits = meta["splits"]
    tokens = sum(split["tokens"] for split in splits.values())
    source = meta["source"]
    where = source.get("dataset_name") or source.get("input_dir") or source.get("from_disk") or source["input_files"]
    tokenizer = meta["tokenizer_source"].get("name_or_path", "trained byte-level BPE")
    print(f"\nText cache written to {output_dir}")
    print(f"  source      {where}")
    print(f"  documents   train {splits['train']['documents']:,}  val {splits['val']['documents']:,}  "
          f"skipped (empty) {meta['skipped_documents']:,}")
    print(f"  tokens      train {splits['train']['tokens']:,} ({len(splits['train']['shards'])} shard(s))  "
          f"val {splits['val']['tokens']:,} ({len(splits['val']['shards'])} shard(s))  as {meta['dtype']}")
    print(f"  characters  {meta['chars']:,} ({meta['chars'] / max(tokens, 1):.2f} per token, EOS included)")
    print(f"  tokenizer   {tokenizer}, {meta['vocab_size']:,} tokens, saved in {Path(output_dir, meta['tokenizer'])}")
    print(f"  time        {total_seconds:.1f} s (tokenizer {tokenizer_seconds:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())
