"""The latent cache of preprocess_image_diffusion_dataset.py as pretrain_image_diffusion.py reads it: a train and a
validation cache checked against each other, and batched.

    train_cache, val_cache = open_latent_caches(train_dir, val_dir)
    train = CachedBatches(train_cache, batch_size, seed, rank, world_size, collate_latents)

A cache item holds the VAE posterior of one image (latent_mean, latent_logvar: (C, h, w)), its caption's text
embeddings (text_emb: (L_i, D), real tokens only) and caption.
"""

import torch

from data.sharded_cache import ShardedCache

MADE_BY = "preprocess_image_diffusion_dataset.py"
TRAIN_OPEN_SHARDS = 8  # shards kept loaded while training, and so mixed together by CachedBatches


def open_latent_caches(train_dir, val_dir) -> tuple[ShardedCache, ShardedCache]:
    """The train and validation latent caches, checked to hold latents of the same VAE and text encoder."""
    train = ShardedCache(train_dir, made_by=f"{MADE_BY} --split train", open_shards=TRAIN_OPEN_SHARDS)
    val = ShardedCache(val_dir, made_by=f"{MADE_BY} --split validation")
    for cache in (train, val):
        if "latent_shape" not in cache.meta:
            raise ValueError(f"{cache.directory} is not a latent cache (its meta.json has no latent_shape): write "
                             f"it with {MADE_BY}")
    for key in ("latent_shape", "text_encoder", "vae_checkpoint"):
        if train.meta[key] != val.meta[key]:
            raise ValueError(f"the train cache {train.directory} and the validation cache {val.directory} differ in "
                             f"{key} ({train.meta[key]} vs {val.meta[key]}): write both with the same {MADE_BY} "
                             "--vae_checkpoint and --text_encoder")
    return train, val


def collate_latents(items: list[dict]) -> dict:
    """Cache items -> {"latent_mean", "latent_logvar": (B, C, h, w) float32, "text_emb": (B, L, D) float32
    right-padded with zeros, "text_mask": (B, L) bool}."""
    lengths = [item["text_emb"].shape[0] for item in items]
    text = torch.zeros(len(items), max(lengths), items[0]["text_emb"].shape[1])
    mask = torch.zeros(len(items), max(lengths), dtype=torch.bool)
    for row, (item, length) in enumerate(zip(items, lengths)):
        text[row, :length] = item["text_emb"].float()
        mask[row, :length] = True
    return {"latent_mean": torch.stack([item["latent_mean"].float() for item in items]),
            "latent_logvar": torch.stack([item["latent_logvar"].float() for item in items]),
            "text_emb": text, "text_mask": mask}
