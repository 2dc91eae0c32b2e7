"""Write the interleaved cache of the multimodal world model (pretrain_wm.py with a multimodal config), one split
per run: captioned images encoded by a trained image VAE, spoken clips with their transcripts (from an utterance
cache, as audio-VAE latents or log-mel frames), the captions and transcripts tokenized by the text tokenizer, each
image or clip in both orders (caption -> media for text-to-image and text-to-speech, media -> caption for
captioning and recognition), and optionally text-only windows from a text cache.

    python preprocess_multimodal_dataset.py --dataset_name builtin:shapes --image_size 32 --max_images 4000 \\
        --vae_checkpoint runs/shapes_vae/checkpoint-1800 --train_tokenizer --vocab_size 512 \\
        --output_dir cached_datasets/wm_train
    python preprocess_multimodal_dataset.py --split validation --dataset_name builtin:shapes --image_size 32 \\
        --max_images 200 --vae_checkpoint runs/shapes_vae/checkpoint-1800 \\
        --tokenizer cached_datasets/wm_train/tokenizer --output_dir cached_datasets/wm_val
    python preprocess_multimodal_dataset.py --image_cache_dir cached_datasets/image_train_cached \\
        --vae_checkpoint runs/image_vae_run/checkpoint-XXX --text_cache_dir cached_datasets/text    # + text windows
    python preprocess_multimodal_dataset.py --dataset_name builtin:shapes --image_size 32 \\
        --vae_checkpoint runs/shapes_vae/checkpoint-1800 --audio_cache_dir cached_datasets/phrases_train \\
        --audio_vae_checkpoint runs/phrases_vae/checkpoint-2000 --audio_frames 192 --train_tokenizer  # + speech
(checkpoint-XXX: the step of the VAE checkpoint that pretrain_image_vae.py wrote, e.g. checkpoint-1000.)

Images (given --vae_checkpoint) come from an image cache of preprocess_image_vae_dataset.py (--image_cache_dir) or
straight from a source with its flags (--dataset_name, --input_dir, --from_disk, --image_size, ...). The VAE is
--vae_checkpoint (a checkpoint directory of pretrain_image_vae.py; --vae_config only for one without config.yaml).
Audio (given --audio_cache_dir) comes from an utterance cache of preprocess_audio_diffusion_dataset.py (log-mels,
transcripts, speaker embeddings): each clip padded with silence to --audio_frames mel frames (default: the
longest; longer ones are skipped and counted; give the validation split the train split's value), then encoded by
the audio VAE of --audio_vae_checkpoint (a pretrain_audio_vae.py checkpoint; --audio_representation latent) or kept
as normalised log-mel bands (--audio_representation mel). The tokenizer is --tokenizer (a saved tokenizer directory
or hub name), the text cache's (--text_cache_dir), or --train_tokenizer (a byte-level BPE trained on this split's
captions and transcripts; it holds the images in memory while training). The tokenizer is saved in
OUTPUT_DIR/tokenizer: pass that directory as --tokenizer for the validation split.

Items (see data/multimodal_batches.py): caption_ids, caption, order, and image_latent_mean/image_latent_logvar
(C, h, w) of the VAE posterior with the builtin:shapes attributes, or audio_latent_mean (channels, frames) with
audio_condition (the speaker embedding), speaker and source_id; text_ids for text windows. meta.json records every
encoder used: the image VAE (vae_checkpoint, vae_config, vae_fingerprint of its weights, image_size), media.image
(latent_shape, latent_scale_factor = 1 / std of the posterior samples), media.audio (latent_shape,
latent_scale_factor, representation, mel_frames, features, the audio VAE's checkpoint, config and fingerprint,
the speaker encoder, the utterance cache; see data/multimodal_audio.py), the tokenizer (vocabulary size, special
tokens, fingerprint), the source and the counts.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.cli import run_preprocessing
from data.image_latents import (SHORT_SPLIT, LatentStatistics, add_image_items_arguments, check_image_size,
                                checkpoint_fingerprint, encode_images, image_batches, image_items)
from data.multimodal_audio import REPRESENTATIONS, AudioClips, open_audio_cache
from data.multimodal_batches import ORDERS
from data.sharded_cache import ShardedCacheWriter, check_output_dir
from data.text_cache import TextTokenCache
from data.tokenizer import DocumentEncoder, load_tokenizer, special_token_ids, train_bpe_tokenizer
from training.distributed import choose_device
from model.audio.pipeline import load_audio_vae_checkpoint
from model.image.pipeline import load_vae_checkpoint

STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
TOKENIZER_DIR = "tokenizer"
MAX_LISTED_SKIPS = 100


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_image_items_arguments(parser)

    audio = parser.add_argument_group("audio: an utterance cache of preprocess_audio_diffusion_dataset.py")
    audio.add_argument("--audio_cache_dir", help="this split's utterance cache (no audio without it)")
    audio.add_argument("--audio_representation", choices=REPRESENTATIONS, default="latent",
                       help="frames of the audio VAE's latents, or normalised log-mel bands")
    audio.add_argument("--audio_vae_checkpoint", help="checkpoint directory of pretrain_audio_vae.py (for latent)")
    audio.add_argument("--audio_frames", type=int, help="clip length in mel frames (default: the longest utterance)")
    audio.add_argument("--audio_frames_multiple", type=int, default=4,
                       help="frames per clip are rounded up to a multiple of this (a config's patch_frames)")
    audio.add_argument("--max_clips", type=int, help="clips at most (default: every utterance)")

    models = parser.add_argument_group("encoders")
    models.add_argument("--vae_checkpoint", help="checkpoint directory of pretrain_image_vae.py (no images without it)")
    models.add_argument("--vae_config", help="VAE config name or YAML, for a checkpoint without config.yaml")
    models.add_argument("--tokenizer", help="a saved tokenizer directory (or hub name)")
    models.add_argument("--train_tokenizer", action="store_true", help="train a byte-level BPE on the captions")
    models.add_argument("--vocab_size", type=int, default=512, help="vocabulary size for --train_tokenizer")
    models.add_argument("--max_caption_tokens", type=int, default=64, help="longer captions are cut")
    models.add_argument("--batch_size", type=int, default=32, help="images encoded at once")
    models.add_argument("--device", help="cpu or cuda (default: cuda when available)")

    text = parser.add_argument_group("text-only sequences (optional)")
    text.add_argument("--text_cache_dir", help="a text cache of preprocess_text_dataset.py; its tokenizer is used")
    text.add_argument("--text_tokens", type=int, default=64, help="tokens per text window")
    text.add_argument("--max_text_items", type=int, default=1000, help="text windows at most")

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", help="default cached_datasets/wm_<train|val>")
    output.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS),
                        help="the orders each captioned image is written in (default: both)")
    output.add_argument("--storage_dtype", choices=sorted(STORAGE_DTYPES), default="float16")
    output.add_argument("--items_per_shard", type=int, default=1024)
    output.add_argument("--overwrite", action="store_true", help="replace an existing cache at --output_dir")
    return parser


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary: two caches with the same fingerprint tokenize alike."""
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(vocabulary.encode()).hexdigest()[:16]


def describe_tokenizer(tokenizer, origin: str) -> dict:
    return {"origin": origin, "vocab_size": len(tokenizer), "fingerprint": tokenizer_fingerprint(tokenizer),
            **special_token_ids(tokenizer)}


def _choose_tokenizer(args, text_cache, items, clips):
    """(tokenizer, where it came from, the image items to encode: a list when they had to be read for training)."""
    chosen = [name for name, given in (("--tokenizer", args.tokenizer), ("--train_tokenizer", args.train_tokenizer),
                                       ("--text_cache_dir", text_cache)) if given]
    if len(chosen) != 1:
        raise ValueError("give exactly one tokenizer: --tokenizer DIR, --train_tokenizer (on the captions) or "
                         f"--text_cache_dir (its tokenizer); got {', '.join(chosen) or 'none'}")
    if text_cache is not None:
        return text_cache.load_tokenizer(), str(text_cache.cache_dir.resolve()), items
    if args.tokenizer:
        return load_tokenizer(args.tokenizer), str(Path(args.tokenizer).resolve()) if Path(args.tokenizer).exists() \
            else args.tokenizer, items
    items = list(items)
    captions = [item["caption"] for item, _ in items if item is not None]
    transcripts = clips.transcripts(args.max_clips) if clips is not None else []
    return train_bpe_tokenizer(captions + transcripts, args.vocab_size), "trained on the captions", items


def _text_windows(text_cache: TextTokenCache, split: str, tokens: int, max_items: int):
    """Consecutive windows of `tokens` token ids from the text cache's split (train or val)."""
    ids = text_cache.tokens("val" if split in ("val", "validation") else "train")
    count = min(max_items, len(ids) // tokens)
    for index in range(count):
        yield {"text_ids": torch.from_numpy(np.asarray(ids[index * tokens:(index + 1) * tokens]).astype(np.int32))}


def write_multimodal_cache(args) -> dict:
    """Write the split into args.output_dir (set); returns meta.json's contents."""
    if not args.vae_checkpoint and not args.audio_cache_dir:
        raise ValueError("give --vae_checkpoint (images: a checkpoint directory of pretrain_image_vae.py, "
                         "runs/RUN_NAME/checkpoint-STEP), --audio_cache_dir (speech: an utterance cache of "
                         "preprocess_audio_diffusion_dataset.py), or both")
    for name in ("batch_size", "items_per_shard", "max_caption_tokens", "text_tokens", "max_text_items"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    split = "validation" if args.split == "val" else args.split
    check_output_dir(args.output_dir, args.overwrite)
    device = choose_device(args.device)
    clips = _audio_clips(args, device) if args.audio_cache_dir else None
    text_cache = TextTokenCache(args.text_cache_dir) if args.text_cache_dir else None
    vae, mismatch, items, count, image_size, source = None, [], iter(()), 0, None, None
    if args.vae_checkpoint:
        vae, mismatch = load_vae_checkpoint(args.vae_checkpoint, args.vae_config, device)
        items, count, image_size, source = image_items(args, split)
        check_image_size(image_size, vae)
    tokenizer, tokenizer_origin, items = _choose_tokenizer(args, text_cache, items, clips)
    encode_text = DocumentEncoder(tokenizer)
    writer = ShardedCacheWriter(args.output_dir, items_per_shard=args.items_per_shard, overwrite=args.overwrite)
    with writer:
        counts = {"items": 0, "images": 0, "clips": 0, "text_items": 0, "caption_tokens": 0, "longest": 0}
        image_meta, skipped = (_write_images(args, writer, items, count, vae, encode_text, device, counts)
                               if vae is not None else (None, []))
        if clips is not None:
            audio_shape, audio_skipped = _write_clips(args, writer, clips, encode_text, counts)
            skipped += audio_skipped
        if not counts["images"] + counts["clips"]:
            raise ValueError(f"no image or clip could be encoded ({len(skipped)} skipped)")
        if text_cache is not None:
            for window in _text_windows(text_cache, split, args.text_tokens, args.max_text_items):
                writer.add(window)
                counts["text_items"] += 1
        tokenizer.save_pretrained(writer.scratch / TOKENIZER_DIR)
        media = {"image": image_meta} if image_meta is not None else {}
        if clips is not None:
            media["audio"] = clips.describe(audio_shape)
        return writer.finish({
            "made_by": "preprocess_multimodal_dataset.py", "split": split, "source": source, "image_size": image_size,
            "media": media, "orders": list(args.orders), "storage_dtype": args.storage_dtype,
            "vae_checkpoint": str(Path(args.vae_checkpoint).resolve()) if vae is not None else None,
            "vae_fingerprint": checkpoint_fingerprint(args.vae_checkpoint) if vae is not None else None,
            "vae_config": vae.config.to_dict() if vae is not None else None,
            "vae_config_mismatch": mismatch, "tokenizer": {**describe_tokenizer(tokenizer, tokenizer_origin),
                                                           "directory": TOKENIZER_DIR},
            "mean_caption_tokens": counts["caption_tokens"] / (counts["images"] + counts["clips"]),
            "longest_caption_tokens": counts["longest"],
            "text_tokens": args.text_tokens if counts["text_items"] else None,
            "text_cache": str(text_cache.cache_dir.resolve()) if text_cache is not None else None,
            "counts": {"images": counts["images"], "clips": counts["clips"],
                       "items": counts["items"] + counts["text_items"], "text_items": counts["text_items"],
                       "skipped": len(skipped)}, "skipped": skipped[:MAX_LISTED_SKIPS]})


def _audio_clips(args, device: torch.device) -> AudioClips:
    if args.max_clips is not None and args.max_clips < 1:
        raise ValueError(f"--max_clips must be at least 1, got {args.max_clips}")
    if args.audio_representation == "mel" and args.audio_vae_checkpoint:
        raise ValueError("--audio_vae_checkpoint is for --audio_representation latent; log-mel frames need no VAE")
    cache = open_audio_cache(args.audio_cache_dir)
    vae = None
    if args.audio_representation == "latent" and args.audio_vae_checkpoint:
        vae = load_audio_vae_checkpoint(args.audio_vae_checkpoint, device)
    return AudioClips(cache, args.audio_representation, vae, args.audio_vae_checkpoint, args.audio_frames,
                      args.audio_frames_multiple)


def _add_captioned(writer, entry: dict, caption_ids: list, args, counts: dict) -> None:
    """One captioned image or clip, in each of args.orders."""
    caption_ids = caption_ids[:args.max_caption_tokens]
    entry = {**entry, "caption_ids": torch.tensor(caption_ids, dtype=torch.int32)}
    for order in args.orders:
        writer.add({**entry, "order": order})
        counts["items"] += 1
    counts["caption_tokens"] += len(caption_ids)
    counts["longest"] = max(counts["longest"], len(caption_ids))


def _write_images(args, writer, items, count, vae, encode_text, device, counts) -> tuple[dict, list]:
    """Encode and write the captioned images → (meta's media.image, skipped images)."""
    dtype = STORAGE_DTYPES[args.storage_dtype]
    statistics, skipped, shape = LatentStatistics(), [], None
    with tqdm(total=count, desc="encoding images", unit=" img") as progress:
        for good, skips in image_batches(items, args.batch_size, progress):
            skipped += skips
            if not good:
                continue
            means, logvars = encode_images(good, vae, device)
            for item, mean, logvar, caption_ids in zip(good, means, logvars, encode_text([i["caption"] for i in good])):
                entry = {key: value for key, value in item.items() if key != "image"}
                entry.update(image_latent_mean=mean.to(dtype).cpu(), image_latent_logvar=logvar.to(dtype).cpu())
                _add_captioned(writer, entry, caption_ids, args, counts)
                statistics.add(entry["image_latent_mean"], entry["image_latent_logvar"])
                shape = list(entry["image_latent_mean"].shape)
                counts["images"] += 1
    if not counts["images"]:
        raise ValueError(f"no image could be encoded ({len(skipped)} skipped)")
    latent_mean, latent_std = statistics.mean_and_std()
    return {"latent_shape": shape, "latent_scale_factor": 1.0 / latent_std, "latent_mean": latent_mean,
            "latent_std": latent_std}, skipped


def _write_clips(args, writer, clips: AudioClips, encode_text, counts) -> tuple[list, list]:
    """Encode and write the spoken clips → (their frames' shape, skipped utterances)."""
    dtype = STORAGE_DTYPES[args.storage_dtype]
    skipped, shape = [], None
    for entry, skip in tqdm(clips.entries(args.max_clips), desc="encoding clips", unit=" clip"):
        if entry is None:
            skipped.append(skip)
            continue
        entry["audio_latent_mean"] = entry["audio_latent_mean"].to(dtype)
        shape = list(entry["audio_latent_mean"].shape)
        _add_captioned(writer, entry, encode_text([entry["caption"]])[0], args, counts)
        counts["clips"] += 1
    if not counts["clips"]:
        raise ValueError(f"no clip of {args.audio_cache_dir} fits --audio_frames {clips.mel_frames} "
                         f"({len(skipped)} skipped): give a larger --audio_frames")
    return shape, skipped


def main(argv: list[str] | None = None) -> int:
    return run_preprocessing(argv, build_parser(), write, print_summary)


def write(args) -> dict:
    """Write the interleaved cache the flags describe to args.output_dir (set to its default when empty)."""
    split = "validation" if args.split == "val" else args.split
    args.output_dir = args.output_dir or f"cached_datasets/wm_{SHORT_SPLIT.get(split, split)}"
    return write_multimodal_cache(args)


def print_summary(meta: dict, args, seconds: float) -> None:
    counts, text = meta["counts"], meta["tokenizer"]
    print(f"\nInterleaved cache written to {args.output_dir} (split {meta['split']}), {len(meta['orders'])} "
          f"order(s) per image or clip, {counts['skipped']:,} skipped")
    if "image" in meta["media"]:
        image = meta["media"]["image"]
        print(f"  images    {counts['images']:,} of {meta['image_size']}x{meta['image_size']}, latents "
              f"{'x'.join(map(str, image['latent_shape']))} ({meta['storage_dtype']}), scale factor "
              f"{image['latent_scale_factor']:.4f}; VAE {meta['vae_checkpoint']}")
    if "audio" in meta["media"]:
        audio = meta["media"]["audio"]
        print(f"  clips     {counts['clips']:,} of {audio['mel_frames']} mel frames as {audio['representation']} "
              f"frames {'x'.join(map(str, audio['latent_shape']))}, scale factor {audio['latent_scale_factor']:.4f}"
              f"; {audio['counts']['too_long']:,} too long; audio VAE {audio['vae_checkpoint'] or 'none'}, "
              f"speaker encoder {audio['speaker_encoder']['name']}")
    print(f"  text      tokenizer {text['origin']} ({text['vocab_size']} tokens, saved in "
          f"{Path(args.output_dir, TOKENIZER_DIR)}), {meta['mean_caption_tokens']:.1f} tokens per caption or "
          "transcript, "
          f"{counts['text_items']:,} text windows")
    print(f"  time      {seconds:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
