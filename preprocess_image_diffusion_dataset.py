"""Encode captioned images into image-VAE latents and text embeddings for pretrain_image_diffusion.py (one split
per run).

    python preprocess_image_diffusion_dataset.py --output_dir cached_datasets/image_train_diffusion_latents \\
        --vae_checkpoint runs/image_vae_run/checkpoint-XXX --vae_config small
    python preprocess_image_diffusion_dataset.py --split validation \\
        --output_dir cached_datasets/image_val_diffusion_latents --vae_checkpoint runs/image_vae_run/checkpoint-XXX
    python preprocess_image_diffusion_dataset.py --dataset_name builtin:shapes --image_size 64 \\
        --text_encoder builtin:words --vae_checkpoint runs/image_vae_run/checkpoint-XXX     # no image cache needed

(checkpoint-XXX: the step of the VAE checkpoint that pretrain_image_vae.py wrote, e.g. checkpoint-1000.)

Images come from an image cache of preprocess_image_vae_dataset.py (--image_cache_dir; by default
cached_datasets/image_train_cached for --split train and cached_datasets/image_val_cached for validation), or
straight from a source with the flags of preprocess_image_vae_dataset.py (--dataset_name, --input_dir,
--from_disk, --image_size, ...; see its help).

The VAE is --vae_checkpoint, a checkpoint directory of pretrain_image_vae.py. Its config.yaml gives the
architecture; --vae_config (a name in configs/image_vae/ or a YAML path) is needed only for a directory without
one. Where both exist and disagree, the recorded config wins and the differences are printed and kept in meta.json
(vae_config_mismatch). Captions are embedded by --text_encoder: a Hugging Face T5 name or local directory, or
builtin:words (no download; see model/text_encoders.py).

Each item holds latent_mean and latent_logvar (C, h, w) of the VAE posterior (so training samples new latents
every epoch; --storage_dtype), text_emb (L, D) for the caption's real tokens, caption, source_id and the
builtin:shapes attributes. meta.json adds latent_shape, image_size, latent_scale_factor (1 / the standard deviation
of posterior samples over this split, computed exactly from the stored means and variances), latent_mean,
latent_std, the VAE checkpoint and config, the text encoder's description and mean_text_tokens. Training always
scales by the train cache's factor: a validation cache records its own for information only.
"""

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from data.cli import run_preprocessing
from data.image_latents import (SHORT_SPLIT, LatentStatistics, add_image_items_arguments, check_image_size,
                                encode_images, image_batches, image_items)
from data.sharded_cache import ShardedCacheWriter, check_output_dir
from model.image.pipeline import load_vae_checkpoint
from model.text_encoders import BUILTIN_WORDS, DEFAULT_MAX_LENGTH, DEFAULT_TEXT_ENCODER, load_text_encoder
from training.distributed import choose_device

STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
MAX_LISTED_SKIPS = 100


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_image_items_arguments(parser)

    models = parser.add_argument_group("encoders")
    models.add_argument("--vae_checkpoint", help="checkpoint directory of pretrain_image_vae.py (required)")
    models.add_argument("--vae_config", help="VAE config name or YAML, for a checkpoint without config.yaml")
    models.add_argument("--text_encoder", default=DEFAULT_TEXT_ENCODER,
                        help=f"T5 hub name or local directory, or {BUILTIN_WORDS} (offline)")
    models.add_argument("--text_max_length", type=int, default=DEFAULT_MAX_LENGTH, help="tokens per caption at most")
    models.add_argument("--batch_size", type=int, default=32, help="images encoded at once")
    models.add_argument("--device", help="cpu or cuda (default: cuda when available)")

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", help="default cached_datasets/image_<train|val>_diffusion_latents")
    output.add_argument("--storage_dtype", choices=sorted(STORAGE_DTYPES), default="float16",
                        help="dtype of the stored latents and text embeddings")
    output.add_argument("--items_per_shard", type=int, default=1024)
    output.add_argument("--overwrite", action="store_true", help="replace an existing cache at --output_dir")
    return parser


@torch.no_grad()
def encode_batch(items: list[dict], vae, text_encoder, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Image-cache items ({"image": uint8 (3, H, W), "caption", ...}) -> latent-cache items (see the docstring)."""
    means, logvars = encode_images(items, vae, device)
    text_emb, text_mask = text_encoder.encode([item["caption"] for item in items])
    entries = []
    for row, item in enumerate(items):
        entry = {key: value for key, value in item.items() if key != "image"}
        entry["latent_mean"] = means[row].to(dtype).cpu()
        entry["latent_logvar"] = logvars[row].to(dtype).cpu()
        entry["text_emb"] = text_emb[row][text_mask[row]].to(dtype).cpu()
        entries.append(entry)
    return entries


def write_latent_cache(args) -> dict:
    """Encode every image of the chosen split into args.output_dir (set); returns meta.json's contents."""
    if not args.vae_checkpoint:
        raise ValueError("--vae_checkpoint is required: a checkpoint directory of pretrain_image_vae.py "
                         "(runs/RUN_NAME/checkpoint-STEP)")
    for name in ("batch_size", "items_per_shard", "text_max_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max_images must be positive, got {args.max_images}")
    split = "validation" if args.split == "val" else args.split
    check_output_dir(args.output_dir, args.overwrite)
    device = choose_device(args.device)
    vae, mismatch = load_vae_checkpoint(args.vae_checkpoint, args.vae_config, device)
    items, count, image_size, source = image_items(args, split)
    check_image_size(image_size, vae)
    text_encoder = load_text_encoder(args.text_encoder, device, args.text_max_length)
    dtype = STORAGE_DTYPES[args.storage_dtype]
    statistics, skipped, written, text_tokens = LatentStatistics(), [], 0, 0
    writer = ShardedCacheWriter(args.output_dir, items_per_shard=args.items_per_shard, overwrite=args.overwrite)
    with writer, tqdm(total=count, desc="encoding", unit=" img") as progress:
        for good, skips in image_batches(items, args.batch_size, progress):
            skipped += skips
            for entry in encode_batch(good, vae, text_encoder, device, dtype) if good else []:
                writer.add(entry)
                statistics.add(entry["latent_mean"], entry["latent_logvar"])
                text_tokens += entry["text_emb"].shape[0]
                written += 1
        if not written:
            raise ValueError(f"no image could be encoded ({len(skipped)} skipped)")
        latent_mean, latent_std = statistics.mean_and_std()
        channels, height, width = entry["latent_mean"].shape
        return writer.finish({
            "made_by": "preprocess_image_diffusion_dataset.py", "split": split, "source": source,
            "image_size": image_size, "latent_shape": [channels, height, width],
            "latent_scale_factor": 1.0 / latent_std, "latent_mean": latent_mean, "latent_std": latent_std,
            "storage_dtype": args.storage_dtype, "vae_checkpoint": str(Path(args.vae_checkpoint).resolve()),
            "vae_config": vae.config.to_dict(), "vae_config_mismatch": mismatch,
            "text_encoder": text_encoder.describe(), "mean_text_tokens": text_tokens / written,
            "counts": {"images": written, "skipped": len(skipped)}, "skipped": skipped[:MAX_LISTED_SKIPS]})


def main(argv: list[str] | None = None) -> int:
    return run_preprocessing(argv, build_parser(), write, print_summary)


def write(args) -> dict:
    """write_latent_cache with args.output_dir set to its default when empty."""
    split = "validation" if args.split == "val" else args.split
    args.output_dir = args.output_dir or f"cached_datasets/image_{SHORT_SPLIT.get(split, split)}_diffusion_latents"
    return write_latent_cache(args)


def print_summary(meta: dict, args, seconds: float) -> None:
    counts, text = meta["counts"], meta["text_encoder"]
    split, source = meta["split"], meta["source"]
    where = source.get("image_cache_dir") or source.get("dataset_name") or source.get("input_dir") or \
        source.get("from_disk")
    print(f"\nLatent cache written to {args.output_dir}")
    print(f"  images    {counts['images']:,} of {meta['image_size']}x{meta['image_size']} from {where} (split {split}),"
          f" {counts['skipped']:,} skipped")
    for entry in meta["skipped"][:10]:
        print(f"    {entry['source_id']}: {entry['reason']}")
    print(f"  latents   {'x'.join(map(str, meta['latent_shape']))} ({meta['storage_dtype']}), std "
          f"{meta['latent_std']:.4f}, scale factor {meta['latent_scale_factor']:.4f}")
    print(f"  VAE       {meta['vae_checkpoint']} (config {meta['vae_config']['name']})")
    if meta["vae_config_mismatch"]:
        print(f"  VAE config mismatch: --vae_config {args.vae_config} differs from the checkpoint's config.yaml, "
              "which was used:")
        for line in meta["vae_config_mismatch"]:
            print(f"    {line}")
    print(f"  text      {text['name']} (dim {text['dim']}, at most {text['max_length']} tokens; "
          f"{meta['mean_text_tokens']:.1f} per caption on average)")
    print(f"  time      {seconds:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
