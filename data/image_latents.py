"""What the latent-cache writers share (preprocess_image_diffusion_dataset.py, preprocess_multimodal_dataset.py):
the images of one split, from an image cache or a source, their VAE posteriors, and exact statistics of the
posterior samples.

    add_image_items_arguments(parser)                                # --split, --image_cache_dir or a source
    items, count, image_size, source = image_items(args, "train")   # (item | None, skip | None) pairs
    check_image_size(image_size, vae)
    for good, skips in image_batches(items, batch_size, progress):
        mean, logvar = encode_images(good, vae, device)
    statistics = LatentStatistics(); statistics.add(mean, logvar); mean, std = statistics.mean_and_std()
"""

import functools
import hashlib
import itertools
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from data.builtin_shapes import MIN_IMAGE_SIZE
from data.image_sources import add_image_source_arguments, image_source_from_args, load_image_item
from data.sharded_cache import ShardedCache, map_in_workers

SHORT_SPLIT = {"train": "train", "validation": "val", "val": "val"}


def add_image_items_arguments(parser) -> None:
    """The flags image_items reads: --split, and a group with --image_cache_dir or the flags of
    data.image_sources.add_image_source_arguments (one of them)."""
    parser.add_argument("--split", default="train", help="train or validation (val), or a dataset's split name")
    images = parser.add_argument_group("images: an image cache, or a source as in preprocess_image_vae_dataset.py")
    where = images.add_mutually_exclusive_group()
    where.add_argument("--image_cache_dir", help="written by preprocess_image_vae_dataset.py (default: "
                                                 "cached_datasets/image_<train|val>_cached)")
    add_image_source_arguments(images, where)


def image_items(args, split: str):
    """(iterator of (item | None, skip | None), number of images or None, image size, where they come from).

    args: image_cache_dir, max_images and the flags of data.image_sources.add_image_source_arguments. Without
    --image_cache_dir or a source, the split's default image cache cached_datasets/image_<train|val>_cached."""
    if args.image_cache_dir or not (args.dataset_name or args.input_dir or args.from_disk):
        directory = args.image_cache_dir or f"cached_datasets/image_{SHORT_SPLIT.get(split, split)}_cached"
        cache = ShardedCache(directory, made_by=f"preprocess_image_vae_dataset.py --split {split}")
        if "image_size" not in cache.meta:
            raise ValueError(f"{directory} is not an image cache (its meta.json has no image_size): write it with "
                             "preprocess_image_vae_dataset.py")
        count = min(len(cache), args.max_images or len(cache))
        source = {"kind": "image_cache", "image_cache_dir": str(Path(directory).resolve()),
                  "source": cache.meta.get("source")}
        return ((item, None) for item in itertools.islice(cache, count)), count, cache.meta["image_size"], source
    if args.image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"--image_size must be at least {MIN_IMAGE_SIZE}, got {args.image_size}")
    source = image_source_from_args(args, "validation" if split == "val" else split)
    load = functools.partial(load_image_item, image_size=args.image_size)
    return map_in_workers(load, source.records(), args.num_workers), source.num_images, args.image_size, \
        source.describe()


def check_image_size(image_size: int, vae) -> None:
    """ValueError unless image_size x image_size images fit the VAE's downsampling factor (a multiple of it)."""
    factor = vae.config.downsample_factor
    if image_size % factor:
        raise ValueError(f"{image_size}x{image_size} images do not fit the VAE's downsampling factor {factor}: "
                         f"use --image_size {max(factor, image_size // factor * factor)}")


def image_batches(pairs: Iterable[tuple], batch_size: int, progress) -> Iterator[tuple[list[dict], list[dict]]]:
    """image_items' (item | None, skip | None) pairs, batch_size at a time, as (items, skips) of each batch (either
    may be empty); `progress` (a tqdm bar) advances by the pairs of a batch before it is given out."""
    pairs = iter(pairs)
    while chunk := list(itertools.islice(pairs, batch_size)):
        progress.update(len(chunk))
        yield [item for item, _ in chunk if item is not None], [skip for item, skip in chunk if item is None]


@torch.no_grad()
def encode_images(items: list[dict], vae, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Image items ({"image": uint8 (3, H, W), ...}) → the VAE posterior's (mean, logvar), each (B, C, h, w)."""
    images = torch.stack([item["image"] for item in items]).to(device).float() / 127.5 - 1.0
    posterior = vae.encode(images)
    return posterior.mean, posterior.logvar


class LatentStatistics:
    """Mean and variance of posterior samples z ~ N(mean, exp(logvar)) over every latent element, exactly:
    E[z] = avg(mean), E[z^2] = avg(mean^2 + exp(logvar)) (float64 sums)."""

    def __init__(self):
        self.count, self.total, self.total_square = 0, 0.0, 0.0

    def add(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        mean, logvar = mean.double(), logvar.double()
        self.count += mean.numel()
        self.total += float(mean.sum())
        self.total_square += float((mean.square() + logvar.exp()).sum())

    def mean_and_std(self) -> tuple[float, float]:
        mean = self.total / self.count
        return mean, math.sqrt(max(self.total_square / self.count - mean ** 2, 0.0))


def checkpoint_fingerprint(checkpoint_dir) -> str:
    """A short SHA-256 of a checkpoint's model.safetensors: caches and runs made with the same weights share it,
    wherever the checkpoint directory has moved."""
    digest = hashlib.sha256()
    with open(Path(checkpoint_dir) / "model.safetensors", "rb") as weights:
        for block in iter(lambda: weights.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
