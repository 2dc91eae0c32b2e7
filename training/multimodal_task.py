"""The multimodal world-model task for the shared loop (pretrain_wm.py with a multimodal config): batches from an
interleaved cache (preprocess_multimodal_dataset.py), the Transfusion loss with text and image terms logged apart,
evaluation on fixed validation items, captions of fixed validation images and image grids of fixed prompts.

    parser = build_parser(__doc__); add_multimodal_arguments(parser)
    build_task, report = prepare_multimodal(args)          # what training/cli.py's run_training wants

Each micro-batch i draws its caption dropout, posterior latents and noise from generators seeded by
(seed, rank, i): a resumed run sees the same numbers. Each checkpoint holds, beside the model, wm_meta.json (the
VAE checkpoint and the fingerprint of its weights, the latent scale factor, the tokenizer's description) and the
tokenizer itself, which is all generate_wm.py needs. A cache, a --vae_checkpoint or a resumed checkpoint made with
another VAE or tokenizer stops with a message that says which.
"""

import itertools
import json
import logging
from pathlib import Path

import torch
import yaml

from data.cached_batches import CachedBatches, fixed_items
from data.image_latents import checkpoint_fingerprint
from data.multimodal_batches import IMAGE_FIRST, SequenceLayout, collate_multimodal, item_kind
from data.sharded_cache import ShardedCache
from data.tokenizer import load_tokenizer
from model.megatransformer_multimodal import MultimodalConfig, build_multimodal, resolve_multimodal_config
from model.multimodal.generation import caption_media, text_to_media
from model.multimodal.loss import multimodal_loss
from model.multimodal.media import num_positions
from training.arguments import check_arguments
from model.image.pipeline import load_vae_checkpoint
from training.distributed import micro_batch_seed
from training.loop import evaluate_means
from training.task import Image, LossTerms, TrainingTask

logger = logging.getLogger(__name__)

MADE_BY = "preprocess_multimodal_dataset.py"
WM_META = "wm_meta.json"
TOKENIZER_DIR = "tokenizer"
TRAIN_OPEN_SHARDS = 8
EVAL_SEED, SAMPLE_SEED = 1234, 0
DEFAULT_IMAGE_PROMPTS = ("a large red circle in the center on a white background",
                         "a small blue square in the top left on a yellow background",
                         "a green triangle, medium, at the bottom, on black")


def add_multimodal_arguments(parser) -> None:
    group = parser.add_argument_group("multimodal configs (see preprocess_multimodal_dataset.py)")
    group.add_argument("--train_data_dir", default="cached_datasets/wm_train", help="interleaved cache, train split")
    group.add_argument("--val_data_dir", default="cached_datasets/wm_val", help="interleaved cache, validation split")
    group.add_argument("--vae_checkpoint", help="the image VAE that decodes samples (default: the caches'; another "
                                                "one is refused)")
    group.add_argument("--sample_image_prompts", nargs="+", help="prompts of the image grids")
    group.add_argument("--sample_guidance_scales", type=float, nargs="+", default=[1.0, 3.0],
                       help="one grid row per guidance scale")
    group.add_argument("--sample_steps", type=int, help="sampling steps (default: the config's sampling_steps)")
    group.add_argument("--sample_captions", type=int, default=4, help="validation images captioned per sample round")


# ----- caches, VAE and config -----

def identities(meta: dict) -> dict:
    """What must agree between caches and runs: the VAE weights and the tokenizer's vocabulary."""
    return {"VAE": meta["vae_fingerprint"], "tokenizer": meta["tokenizer"]["fingerprint"]}


def open_multimodal_caches(train_dir, val_dir) -> tuple[ShardedCache, ShardedCache]:
    """The train and validation caches, checked to be interleaved caches of the same VAE and tokenizer."""
    train = ShardedCache(train_dir, made_by=f"{MADE_BY} --split train", open_shards=TRAIN_OPEN_SHARDS)
    val = ShardedCache(val_dir, made_by=f"{MADE_BY} --split validation")
    for cache in (train, val):
        if cache.meta.get("made_by") != MADE_BY:
            raise ValueError(f"{cache.directory} is not an interleaved cache (made by "
                             f"{cache.meta.get('made_by', 'an unknown script')}): write it with {MADE_BY}")
    flags = {"VAE": "--vae_checkpoint", "tokenizer": "--tokenizer"}
    train_ids, val_ids = identities(train.meta), identities(val.meta)
    for key, flag in flags.items():
        if train_ids[key] != val_ids[key]:
            raise ValueError(f"the train cache {train.directory} and the validation cache {val.directory} were made "
                             f"with another {key} (fingerprints {train_ids[key]} vs {val_ids[key]}): write both "
                             f"with the same {MADE_BY} {flag}")
    return train, val


def load_cache_vae(cache: ShardedCache, vae_checkpoint: str | None, device: torch.device):
    """The VAE that made the cache's latents: --vae_checkpoint if given (refused when its weights differ from
    the cache's), else the checkpoint the cache records."""
    directory = vae_checkpoint or cache.meta["vae_checkpoint"]
    if not Path(directory, "model.safetensors").is_file():
        raise FileNotFoundError(f"the VAE checkpoint {directory} of {cache.directory} is gone: pass --vae_checkpoint "
                                "the same checkpoint at its new place")
    if checkpoint_fingerprint(directory) != cache.meta["vae_fingerprint"]:
        raise ValueError(f"the VAE checkpoint {directory} is not the one {cache.directory} was made with "
                         f"({cache.meta['vae_checkpoint']}): its latents would decode wrongly; pass that "
                         f"checkpoint, or re-run {MADE_BY} with this one")
    vae, _ = load_vae_checkpoint(directory, device=device)
    return vae, directory


def resolve_config(name: str, overrides: list[str], cache: ShardedCache) -> MultimodalConfig:
    """The named multimodal config with the cache's vocabulary, special tokens and latent grids, then --set.

    `--set "media={image: {patch_size: 4, attention: causal}}"` changes the named keys of a media entry and keeps
    the rest (the latent grid always comes from the cache)."""
    base = resolve_multimodal_config(name)
    media = {kind: dict(entry) for kind, entry in base.media.items()}
    others = []
    for assignment in overrides:
        key, _, text = assignment.partition("=")
        if key.strip() != "media":
            others.append(assignment)
            continue
        given = yaml.safe_load(text)
        if not isinstance(given, dict) or not all(isinstance(entry, dict) for entry in given.values()):
            raise ValueError(f"--set {assignment}: media must map each kind to a mapping of its keys, e.g. "
                             "media={image: {patch_size: 2}}")
        for kind, entry in given.items():
            media[kind] = {**media.get(kind, {}), **entry}
    for kind, recorded in cache.meta["media"].items():
        if kind not in media:
            raise ValueError(f"the cache {cache.directory} holds '{kind}' spans but config '{base.name}' models "
                             f"{', '.join(['text'] + base.media_kinds)}: use a config with '{kind}' in its media")
        channels, height, width = recorded["latent_shape"]
        media[kind].update(latent_channels=channels, latent_height=height, latent_width=width)
    tokenizer = cache.meta["tokenizer"]
    values = {**base.to_dict(), "media": media, "vocab_size": tokenizer["vocab_size"],
              "bos_token_id": tokenizer["bos_token_id"], "eos_token_id": tokenizer["eos_token_id"],
              "pad_token_id": tokenizer["pad_token_id"]}
    try:
        config = MultimodalConfig.from_dict(values)
    except ValueError as error:
        raise ValueError(f"{error} (with the latent grid and vocabulary of {cache.directory})") from None
    return config.with_overrides(others)


class WMState:
    """The loop's extra_state: writes wm_meta.json and the tokenizer into each checkpoint, and refuses to resume
    a checkpoint made with another VAE or tokenizer."""

    def __init__(self, meta: dict, tokenizer):
        self.meta, self.tokenizer = meta, tokenizer

    def save(self, directory: Path) -> None:
        (Path(directory) / WM_META).write_text(json.dumps(self.meta, indent=2) + "\n")
        self.tokenizer.save_pretrained(Path(directory) / TOKENIZER_DIR)

    def load(self, directory: Path) -> None:
        path = Path(directory) / WM_META
        if not path.is_file():
            raise FileNotFoundError(f"{directory} has no {WM_META}: resume from a checkpoint of pretrain_wm.py with a "
                                    "multimodal config")
        recorded, current = identities(json.loads(path.read_text())), identities(self.meta)
        for key in recorded:
            if recorded[key] != current[key]:
                raise ValueError(f"{directory} was trained on a cache made with another {key} (fingerprints "
                                 f"{recorded[key]} vs {current[key]} in {self.meta['train_data_dir']}): resume with "
                                 "the caches it was trained on")


# ----- the task -----

def build_multimodal_task(model, config: MultimodalConfig, train_cache: ShardedCache, val_cache: ShardedCache,
                          vae, tokenizer, args, context) -> TrainingTask:
    """The TrainingTask. args: batch_size, seed, eval_batches, eval_steps, vae_checkpoint (resolved),
    sample_image_prompts, sample_guidance_scales, sample_steps, sample_captions."""
    device = context.device
    scales = {kind: float(meta["latent_scale_factor"]) for kind, meta in train_cache.meta["media"].items()}
    layout = SequenceLayout.from_config(config, {kind: model.span_length(kind) for kind in config.media_kinds})
    train = CachedBatches(train_cache, args.batch_size, args.seed, context.rank, context.world_size, list)

    def collate(items: list, seed: int, caption_dropout: float) -> dict:
        return collate_multimodal(items, layout, scales, caption_dropout, config.caption_noise_cap,
                                  torch.Generator().manual_seed(seed))

    val_items = fixed_items(val_cache, args.eval_batches * args.batch_size)
    val = [{**collate(val_items[start:start + args.batch_size], EVAL_SEED + start, 0.0), "index": torch.tensor(start)}
           for start in range(0, len(val_items), args.batch_size)]
    caption_items = list(itertools.islice((item for item in val_cache if item_kind(item) == "image" and
                                          item["order"] == IMAGE_FIRST), args.sample_captions))
    prompt_ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in args.sample_image_prompts]
    state = WMState({"made_by": "pretrain_wm.py", "vae_checkpoint": str(Path(args.vae_checkpoint).resolve()),
                     "vae_fingerprint": train_cache.meta["vae_fingerprint"], "vae_config": vae.config.to_dict(),
                     "media": train_cache.meta["media"], "image_size": train_cache.meta["image_size"],
                     "tokenizer": train_cache.meta["tokenizer"],
                     "train_data_dir": str(Path(train_cache.directory).resolve())}, tokenizer)
    if context.rank == 0:
        tokenizer.save_pretrained(context.run_dir / TOKENIZER_DIR)

    def train_batch(i: int) -> dict:
        seed = micro_batch_seed(args.seed, context.rank, i)
        return {**collate(train.batch(i), seed, config.caption_dropout), "index": torch.tensor(i)}

    def loss(forward, batch: dict, step: int) -> LossTerms:
        seed = micro_batch_seed(args.seed + 1, context.rank, int(batch["index"]))
        value, logs = multimodal_loss(forward, config, batch, torch.Generator(device=device).manual_seed(seed))
        return LossTerms(value, logs=logs)

    def measure(eval_model, batch: dict) -> dict:
        generator = torch.Generator(device=device).manual_seed(EVAL_SEED + 1_000_003 + int(batch["index"]))
        value, logs = multimodal_loss(eval_model, config, batch, generator)
        return {"loss": value, **{name: logs[name] for name in logs if name.endswith("_loss") and name != "aux_loss"}}

    def evaluate(eval_model) -> dict:
        return {f"eval/{name}": value for name, value in evaluate_means(eval_model, val, measure, device).items()}

    @torch.no_grad()
    def samples(eval_model) -> dict:
        was_training = eval_model.training
        eval_model.eval()
        lines = []
        for item in caption_items:
            latents = item["image_latent_mean"].float().to(device) * scales["image"]
            generated = tokenizer.decode(caption_media(eval_model, latents), skip_special_tokens=True)
            lines.append(f"**{item['caption']}** → {generated}")
        rows = []
        for guidance_scale in args.sample_guidance_scales:
            images = []
            for ids in prompt_ids:
                generator = torch.Generator(device=device).manual_seed(SAMPLE_SEED)
                latents = text_to_media(eval_model, ids, guidance_scale=guidance_scale, steps=args.sample_steps,
                                        generator=generator)
                images.append(vae.decode(latents[None] / scales["image"]).float().clamp(-1, 1)[0])
            rows.append(torch.cat(images, dim=-1))
        eval_model.train(was_training)
        layout_text = (f"rows: guidance scales {', '.join(f'{s:g}' for s in args.sample_guidance_scales)}; "
                       "columns: " + " | ".join(args.sample_image_prompts))
        return {"samples/captions": "\n\n".join(lines), "samples/images": Image(((torch.cat(rows, -2) + 1) / 2).cpu()),
                "samples/layout": layout_text}

    logger.info("multimodal: %d train items (%d batches per epoch per rank), %d validation items", len(train_cache),
                train.batches_per_epoch, len(val_items))
    return TrainingTask(model=model, config=config, train_batch=train_batch, loss=loss,
                        batch_size=lambda batch: int(batch["attention_mask"].sum()), throughput_unit="tokens",
                        evaluate=evaluate, samples=samples, generation_steps=args.generation_steps or args.eval_steps,
                        extra_state=state)


def prepare_multimodal(args):
    """pretrain_wm.py's prepare() for a multimodal config: (build_task(context), report(summary))."""
    args.sample_image_prompts = args.sample_image_prompts or list(DEFAULT_IMAGE_PROMPTS)
    check_arguments(args)
    if args.sample_steps is not None and args.sample_steps < 1:
        raise ValueError(f"--sample_steps must be at least 1, got {args.sample_steps}")
    train_cache, val_cache = open_multimodal_caches(args.train_data_dir, args.val_data_dir)
    config = resolve_config(args.config, args.set, train_cache)
    longest = 4 + train_cache.meta["longest_caption_tokens"] + sum(
        num_positions(kind, config.media[kind]) for kind in config.media_kinds)
    longest = max(longest, train_cache.meta["text_tokens"] or 0)
    if longest > config.max_position_embeddings:
        raise ValueError(f"the longest sequence of {train_cache.directory} has {longest} positions, more than "
                         f"max_position_embeddings={config.max_position_embeddings} of config '{config.name}': "
                         "--set a larger max_position_embeddings, or write the cache with a smaller "
                         "--max_caption_tokens")
    tokenizer = load_tokenizer(str(Path(train_cache.directory, train_cache.meta["tokenizer"]["directory"])))

    def build_task(context):
        vae, args.vae_checkpoint = load_cache_vae(train_cache, args.vae_checkpoint, context.device)
        return build_multimodal_task(build_multimodal(config), config, train_cache, val_cache, vae, tokenizer, args,
                                     context)

    def report(summary: dict) -> str:
        lines = [f"\nfinished {summary['run_dir']} at step {summary['step']} ({summary['tokens']:,} tokens, "
                 f"{summary['skipped_nonfinite']} skipped non-finite)"]
        if "eval/loss" in summary:
            lines.append("validation: " + ", ".join(f"{key.removeprefix('eval/')} {value:.4f}"
                                                    for key, value in summary.items() if key.startswith("eval/")))
        if summary.get("samples/captions"):
            lines.append(f"\ncaptions of validation images (true → generated):\n{summary['samples/captions']}")
        return "\n".join(lines)

    return build_task, report
