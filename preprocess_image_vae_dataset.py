"""Resize and centre-crop captioned images into a sharded cache for pretrain_image_vae.py (one split per run).

    python preprocess_image_vae_dataset.py --dataset_name builtin:shapes --image_size 64          # no download
    python preprocess_image_vae_dataset.py --dataset_name builtin:shapes --image_size 64 --split validation
    python preprocess_image_vae_dataset.py --input_dir my_photos --split train --num_workers 4
    python preprocess_image_vae_dataset.py --output_dir cached_datasets/image_train_cached --dataset_name your_dataset

Sources: a Hugging Face dataset (streamed; needs the hub unless it is a local path), a dataset saved with
`save_to_disk` (--from_disk), a folder of images with captions in a .txt beside each image or in a
metadata.csv / metadata.jsonl (file_name + text or caption), or builtin:shapes (drawn shapes with captions that
describe them; see data/builtin_shapes.py). --split picks the dataset's split; for folders and builtin:shapes,
train and validation are disjoint fixed subsets. Images that cannot be decoded are skipped, counted and listed.

The cache (data/sharded_cache.py) holds items {"image": uint8 (3, S, S), "caption", "source_id"} (plus shape,
color, size, position, background for builtin:shapes) and meta.json with image_size, source, counts and skipped.
"""

import argparse
import functools
import sys

from tqdm import tqdm

from data.builtin_shapes import MIN_IMAGE_SIZE
from data.cli import run_preprocessing
from data.image_sources import (DataSourceError, ImageSource, add_image_source_arguments, image_source_from_args,
                                load_image_item)
from data.sharded_cache import ShardedCacheWriter, check_output_dir, map_in_workers

MAX_LISTED_SKIPS = 100
DEFAULT_SPLIT_NAMES = {"validation": "val"}  # the default output names pretrain_image_vae.py reads


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_image_source_arguments(parser, parser.add_mutually_exclusive_group(required=True))
    parser.add_argument("--split", default="train",
                        help="split to read (val = validation); folders and builtin:shapes: train or validation")
    parser.add_argument("--output_dir", help="cache directory (default cached_datasets/image_train_cached, "
                                             "image_val_cached for validation, image_<split>_cached otherwise)")
    parser.add_argument("--items_per_shard", type=int, default=256, help="images per shard file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cache at --output_dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_preprocessing(argv, build_parser(), write, print_summary)


def write(args) -> dict:
    """Write the image cache the flags describe to args.output_dir (set to its default when empty); returns meta."""
    split_name = DEFAULT_SPLIT_NAMES.get(args.split, args.split)
    args.output_dir = output_dir = args.output_dir or f"cached_datasets/image_{split_name}_cached"
    if args.image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"--image_size must be at least {MIN_IMAGE_SIZE}, got {args.image_size}")
    source = image_source_from_args(args, args.split)
    check_output_dir(output_dir, args.overwrite)
    return write_image_cache(source, output_dir, image_size=args.image_size, num_workers=args.num_workers,
                             items_per_shard=args.items_per_shard, overwrite=args.overwrite)


def write_image_cache(source: ImageSource, output_dir, *, image_size: int, num_workers: int = 0,
                      items_per_shard: int = 256, overwrite: bool = False) -> dict:
    """Load, resize and store every image of `source`; returns meta.json's contents. Nothing is written if no
    image could be read."""
    skipped, written = [], 0
    load = functools.partial(load_image_item, image_size=image_size)
    with ShardedCacheWriter(output_dir, items_per_shard=items_per_shard, overwrite=overwrite) as writer:
        results = map_in_workers(load, source.records(), num_workers)
        for item, skip in tqdm(results, total=source.num_images, desc="images", unit=" img"):
            if item is None:
                skipped.append(skip)
                continue
            writer.add(item)
            written += 1
        if not written:
            reasons = f"; first skipped: {skipped[0]['source_id']} ({skipped[0]['reason']})" if skipped else ""
            raise DataSourceError(f"no image could be read from the source ({len(skipped)} skipped){reasons}")
        return writer.finish({
            "made_by": "preprocess_image_vae_dataset.py", "image_size": image_size, "split": source.split,
            "source": source.describe(), "counts": {"images": written, "skipped": len(skipped)},
            "skipped": skipped[:MAX_LISTED_SKIPS]})


def print_summary(meta: dict, args, seconds: float) -> None:
    counts, source, output_dir = meta["counts"], meta["source"], args.output_dir
    where = source.get("dataset_name") or source.get("input_dir") or source.get("from_disk")
    print(f"\nImage cache written to {output_dir}")
    print(f"  source   {where} (split {meta['split']})")
    print(f"  images   {counts['images']:,} at {meta['image_size']}x{meta['image_size']} in {len(meta['shards'])} "
          f"shard(s)")
    print(f"  skipped  {counts['skipped']:,} (could not be decoded)")
    for entry in meta["skipped"][:10]:
        print(f"    {entry['source_id']}: {entry['reason']}")
    if counts["skipped"] > 10:
        print(f"    ... {counts['skipped'] - 10:,} more (the first {len(meta['skipped'])} are listed in meta.json)")
    print(f"  time     {seconds:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
