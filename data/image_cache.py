"""The image cache of preprocess_image_vae_dataset.py as pretrain_image_vae.py reads it: checked against an image
VAE config, and batched.

    train_cache, val_cache = open_image_caches(train_dir, val_dir, config)
    train = CachedBatches(train_cache, batch_size, seed, rank, world_size, stack_images)   # {"image": uint8 (B, 3, H, W)}
"""

import torch

from data.sharded_cache import ShardedCache
from model.image.vae import ImageVAEConfig

MADE_BY = "preprocess_image_vae_dataset.py"
TRAIN_OPEN_SHARDS = 8  # shards kept loaded while training, and so mixed together by CachedBatches


def stack_images(items: list[dict]) -> dict:
    """Cache items -> {"image": uint8 (B, 3, H, W)} (captions stay behind: the loop moves tensors only)."""
    return {"image": torch.stack([item["image"] for item in items])}


def open_image_caches(train_dir, val_dir, config: ImageVAEConfig) -> tuple[ShardedCache, ShardedCache]:
    """The train and validation caches, checked against each other and against the config (ValueError or
    FileNotFoundError saying what to do)."""
    train = ShardedCache(train_dir, made_by=MADE_BY, open_shards=TRAIN_OPEN_SHARDS)
    val = ShardedCache(val_dir, made_by=f"{MADE_BY} --split validation")
    sizes = []
    for cache in (train, val):
        if "image_size" not in cache.meta:
            raise ValueError(f"{cache.directory} is not an image cache (its meta.json has no image_size): write it "
                             f"with {MADE_BY}")
        sizes.append(cache.meta["image_size"])
    if sizes[0] != sizes[1]:
        raise ValueError(f"the train cache {train.directory} holds {sizes[0]}x{sizes[0]} images but the validation "
                         f"cache {val.directory} holds {sizes[1]}x{sizes[1]}: write both with the same "
                         f"{MADE_BY} --image_size")
    size = sizes[0]
    if config.image_channels != 3:
        raise ValueError(f"config '{config.name}' has image_channels={config.image_channels}, but {MADE_BY} "
                         "caches hold RGB images: set image_channels=3")
    factor = config.downsample_factor
    if size % factor:
        raise ValueError(f"image size {size} is not divisible by the downsampling factor {factor} of config "
                         f"'{config.name}' ({len(config.block_out_channels) - 1} downsamplings): write the caches "
                         f"with {MADE_BY} --image_size {max(factor, size // factor * factor)}, or pick a config "
                         "with fewer downsamplings")
    minimum = 3 * 2 ** config.disc_layers
    if config.use_discriminator and size < minimum:
        raise ValueError(f"the PatchGAN of config '{config.name}' (disc_layers={config.disc_layers}) needs images of "
                         f"at least {minimum} pixels, the caches hold {size}: lower disc_layers or raise --image_size")
    return train, val
