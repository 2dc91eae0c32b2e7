"""The image latent-diffusion task for the shared loop: a DiT denoising cached image-VAE latents (written by
preprocess_image_diffusion_dataset.py), conditioned on cached text embeddings.

    train_cache, val_cache = open_latent_caches(train_dir, val_dir)                  # data/latent_cache.py
    config = resolve_diffusion_config("small_dit", ["depth=8"], train_cache)
    vae, _ = load_vae_checkpoint("runs/image_vae_run/checkpoint-5000", device=context.device)   # model/image/pipeline.py
    task = build_image_diffusion_task(DiT(config), config, train_cache, val_cache, vae, args, context)

Each micro-batch i (collated by data/latent_cache.py) samples its latents from the stored VAE posteriors, scales them by the train cache's latent_scale_factor (unit variance) and noises them, all with
a generator seeded by (seed, rank, i): a resumed run draws the same numbers. The loss is model/diffusion's
diffusion_loss (min-SNR weighting, condition dropout); the DiT casts its inputs to its weights' dtype, so the
bfloat16 weights of DeepSpeed's bf16 work as float32 ones do.

EMA weights (float32, outside the module, which DeepSpeed may cast to bfloat16) update after every optimizer step
(training/ema_state.py). Each checkpoint gets ema.safetensors (model.pretrained.load_pretrained(dir, ema=True)) and
diffusion_meta.json: the VAE checkpoint, latent scale factor and text encoder that generate_image.py needs
(model/image/pipeline.py reads both).
Evaluation: eval/loss and eval/mse (raw weights) and eval/ema_loss on fixed validation items with fixed noise.
Samples: one grid per --generation_steps, rows = guidance scales, columns = prompts, sampled with EMA weights
from fixed noise and decoded by the VAE.
"""

import logging
from pathlib import Path

import torch
import yaml

from data.cached_batches import CachedBatches, fixed_items
from data.latent_cache import collate_latents
from data.sharded_cache import ShardedCache
from model.diffusion import EMA, diffusion_loss
from model.image.diffusion import ImageDiffusionConfig
from model.image.pipeline import sample_grid
from model.pretrained import DIFFUSION_META
from model.image.vae import ImageVAE
from model.text_encoders import text_encoder_from_description
from training.distributed import micro_batch_seed
from training.ema_state import EMAState
from training.engines import ForwardWithConfig
from training.task import Image, LossTerms, TrainingTask

logger = logging.getLogger(__name__)

EVAL_SEED = 1234
# from the cache: field of the DiT config -> what it must equal
DATA_KEYS = ("latent_channels", "latent_height", "latent_width", "text_embed_dim")
DEFAULT_SAMPLE_PROMPTS = ("a large red circle in the center on a white background",
                          "a small blue square in the top left on a yellow background",
                          "a green triangle, medium, at the bottom, on black",
                          "large purple star on the right, white background")


# ----- config and noise -----

def resolve_diffusion_config(name: str, overrides: list[str], cache: ShardedCache) -> ImageDiffusionConfig:
    """The named config with --set overrides, its latent grid and text width taken from the cache (ValueError
    if an override sets one of them to another value, or the patch does not divide the latent grid)."""
    channels, height, width = cache.meta["latent_shape"]
    data = dict(zip(DATA_KEYS, (channels, height, width, cache.meta["text_encoder"]["dim"])))
    for assignment in overrides:
        key, _, text = assignment.partition("=")
        key = key.strip()
        if key in data and yaml.safe_load(text) != data[key]:
            raise ValueError(f"--set {assignment.strip()} disagrees with the cache {cache.directory}, whose latents "
                             f"and text give {key}={data[key]}: leave {key} out (it is taken from the cache)")
    base = ImageDiffusionConfig.from_name(name)
    try:
        return base.with_overrides([f"{key}={value}" for key, value in data.items()] + list(overrides))
    except ValueError as error:
        if "divisible by the patch" not in str(error):
            raise
        raise ValueError(f"{error}: the latent grid {height}x{width} comes from {cache.directory}; pick a patch_size "
                         "that divides it, or write the cache from images of another --image_size") from None


def sample_latents(batch: dict, scale_factor: float, generator: torch.Generator) -> torch.Tensor:
    """z = (mean + exp(logvar / 2) * noise) * scale_factor: (B, C, h, w) float32 on the batch's device."""
    mean = batch["latent_mean"].float()
    noise = torch.randn(mean.shape, generator=generator, device=mean.device)
    return (mean + torch.exp(0.5 * batch["latent_logvar"].float()) * noise) * scale_factor


def build_image_diffusion_task(model, config: ImageDiffusionConfig, train_cache: ShardedCache,
                               val_cache: ShardedCache, vae: ImageVAE, args, context) -> TrainingTask:
    """The TrainingTask. args: batch_size, seed, eval_batches, eval_steps, generation_steps (default eval_steps),
    sample_prompts, sample_guidance_scales, sample_steps (default config.sampling_steps), vae_checkpoint."""
    scale_factor = float(train_cache.meta["latent_scale_factor"])
    device = context.device
    train = CachedBatches(train_cache, args.batch_size, args.seed, context.rank, context.world_size, collate_latents)
    val_items = fixed_items(val_cache, args.eval_batches * args.batch_size)
    val = [{**collate_latents(val_items[start:start + args.batch_size]), "index": torch.tensor(start)}
           for start in range(0, len(val_items), args.batch_size)]
    encoder = text_encoder_from_description(train_cache.meta["text_encoder"], device)
    prompt_emb, prompt_mask = encoder.encode(list(args.sample_prompts))
    del encoder
    state = EMAState(EMA(model, decay=config.ema_decay).to(device), {
        "made_by": "pretrain_image_diffusion.py", "vae_checkpoint": str(Path(args.vae_checkpoint).resolve()),
        "vae_config": vae.config.to_dict(), "latent_scale_factor": scale_factor,
        "latent_shape": train_cache.meta["latent_shape"], "image_size": train_cache.meta["image_size"],
        "text_encoder": train_cache.meta["text_encoder"], "train_data_dir": str(Path(train_cache.directory).resolve())},
        DIFFUSION_META)

    def train_batch(i: int) -> dict:
        return {**train.batch(i), "index": torch.tensor(i)}

    def loss(forward, batch: dict, step: int) -> LossTerms:
        generator = torch.Generator(device=device).manual_seed(micro_batch_seed(args.seed, context.rank,
                                                                                int(batch["index"])))
        latents = sample_latents(batch, scale_factor, generator)
        value, logs = diffusion_loss(ForwardWithConfig(forward, config), latents, batch["text_emb"], batch["text_mask"],
                                     generator=generator)
        return LossTerms(value, logs=logs)

    def measure(eval_model, batch: dict) -> dict:
        generator = torch.Generator(device=device).manual_seed(EVAL_SEED + int(batch["index"]))
        latents = sample_latents(batch, scale_factor, generator)
        value, logs = diffusion_loss(eval_model, latents, batch["text_emb"], batch["text_mask"], generator=generator,
                                     cfg_dropout=0.0)
        return {"loss": value, "mse": logs["mse"]}

    def evaluate(eval_model) -> dict:
        return state.evaluate(eval_model, val, measure, device)

    @torch.no_grad()
    def samples(eval_model) -> dict:
        with state.sampling(eval_model):
            grid = sample_grid(eval_model, vae, prompt_emb, prompt_mask, scale_factor, args.sample_guidance_scales,
                               args.sample_steps)
        layout = (f"rows: guidance scales {', '.join(f'{s:g}' for s in args.sample_guidance_scales)} (EMA weights); "
                  "columns: " + " | ".join(args.sample_prompts))
        return {"samples/images": Image(grid.cpu()), "samples/layout": layout}

    _, height, width = train_cache.meta["latent_shape"]
    text_tokens = round(train_cache.meta["mean_text_tokens"])
    logger.info("image diffusion: %d train items (%d batches per epoch per rank), %d validation items, latents %s "
                "scaled by %.4f", len(train_cache), train.batches_per_epoch, len(val_items),
                "x".join(map(str, train_cache.meta["latent_shape"])), scale_factor)
    return TrainingTask(model=model, config=config, train_batch=train_batch, loss=loss,
                        batch_size=lambda batch: batch["latent_mean"].shape[0], throughput_unit="images",
                        flops_per_token=3 * model.forward_flops(height, width, text_tokens), evaluate=evaluate,
                        samples=samples, generation_steps=args.generation_steps or args.eval_steps,
                        after_step=state.after_step, extra_state=state)
