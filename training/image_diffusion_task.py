"""The image latent-diffusion task for the shared loop: a DiT denoising cached image-VAE latents (written by
preprocess_image_diffusion_dataset.py), conditioned on cached text embeddings.

    train_cache, val_cache = open_latent_caches(train_dir, val_dir)
    config = resolve_diffusion_config("small_dit", ["depth=8"], train_cache)
    vae, _ = load_vae_checkpoint("runs/image_vae_run/checkpoint-5000", device=context.device)
    task = build_image_diffusion_task(DiT(config), config, train_cache, val_cache, vae, args, context)

A cache item holds the VAE posterior of one image (latent_mean, latent_logvar: (C, h, w)), its caption's text
embeddings (text_emb: (L_i, D), real tokens only) and caption. Each micro-batch i samples its latents from the
stored posteriors, scales them by the train cache's latent_scale_factor (unit variance) and noises them, all with
a generator seeded by (seed, rank, i): a resumed run draws the same numbers. The loss is model/diffusion's
diffusion_loss (min-SNR weighting, condition dropout); the DiT casts its inputs to its weights' dtype, so the
bfloat16 weights of DeepSpeed's bf16 work as float32 ones do.

EMA weights (float32, outside the module, which DeepSpeed may cast to bfloat16) update after every optimizer step.
Each checkpoint gets ema.safetensors (loadable into the same DiT with model.pretrained.load_weights) and
diffusion_meta.json: the VAE checkpoint, latent scale factor and text encoder that generate_image.py needs.
Evaluation: eval/loss and eval/mse (raw weights) and eval/ema_loss on fixed validation items with fixed noise.
Samples: one grid per --generation_steps, rows = guidance scales, columns = prompts, sampled with EMA weights
from fixed noise and decoded by the VAE.
"""

import json
import logging
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from data.cached_batches import CachedBatches, fixed_items
from data.sharded_cache import ShardedCache
from model.diffusion import EMA, diffusion_loss, sample
from model.diffusion.dit import DiT
from model.image.diffusion import ImageDiffusionConfig, build_image_diffusion
from model.image.vae import ImageVAE, ImageVAEConfig, build_image_vae
from model.pretrained import load_weights
from model.text_encoders import text_encoder_from_description
from training.loop import evaluate_means
from training.task import Image, LossTerms, TrainingTask

logger = logging.getLogger(__name__)

MADE_BY = "preprocess_image_diffusion_dataset.py"
DIFFUSION_META = "diffusion_meta.json"
EMA_FILE = "ema.safetensors"
TRAIN_OPEN_SHARDS = 8
EVAL_SEED, SAMPLE_SEED = 1234, 0
# from the cache: field of the DiT config -> what it must equal
DATA_KEYS = ("latent_channels", "latent_height", "latent_width", "text_embed_dim")
DEFAULT_SAMPLE_PROMPTS = ("a large red circle in the center on a white background",
                          "a small blue square in the top left on a yellow background",
                          "a green triangle, medium, at the bottom, on black",
                          "large purple star on the right, white background")


# ----- the VAE -----

def load_vae_checkpoint(directory, fallback_config: str | None = None,
                        device: torch.device | str = "cpu") -> tuple[ImageVAE, list[str]]:
    """The eval-mode float32 VAE of a checkpoint directory (model.safetensors, config.yaml) and the differences
    between its recorded config.yaml and `fallback_config` (a name in configs/image_vae/ or a YAML path), which is
    used only where the checkpoint records none: ["key: checkpoint X, --vae_config Y", ...], empty if they agree."""
    directory = Path(directory)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        what = "does not exist" if not directory.exists() else "has no model.safetensors"
        raise FileNotFoundError(f"VAE checkpoint {directory} {what}: pass --vae_checkpoint a checkpoint directory "
                                "written by pretrain_image_vae.py (runs/RUN/checkpoint-STEP)")
    given = ImageVAEConfig.from_name(fallback_config) if fallback_config else None
    mismatch = []
    if (directory / "config.yaml").is_file():
        config = ImageVAEConfig.from_yaml(directory / "config.yaml")
        if given is not None:
            recorded, named = config.to_dict(), given.to_dict()
            mismatch = [f"{key}: checkpoint {recorded[key]!r}, --vae_config {named[key]!r}" for key in recorded
                        if key != "name" and recorded[key] != named[key]]
    elif given is not None:
        config = given
    else:
        raise ValueError(f"VAE checkpoint {directory} has no config.yaml: name its architecture with --vae_config "
                         "(a config in configs/image_vae/ or a YAML path)")
    vae = build_image_vae(config)
    load_weights(vae, weights)
    return vae.to(device).eval().requires_grad_(False), mismatch


# ----- caches and config -----

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


def sample_latents(batch: dict, scale_factor: float, generator: torch.Generator) -> torch.Tensor:
    """z = (mean + exp(logvar / 2) * noise) * scale_factor: (B, C, h, w) float32 on the batch's device."""
    mean = batch["latent_mean"].float()
    noise = torch.randn(mean.shape, generator=generator, device=mean.device)
    return (mean + torch.exp(0.5 * batch["latent_logvar"].float()) * noise) * scale_factor


def micro_batch_seed(seed: int, rank: int, index: int) -> int:
    """The generator seed of micro-batch `index` of `rank`: a pure function of its arguments."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + index) % 2 ** 63


class _Denoiser:
    """The DiT's config with a forward that may be DeepSpeed's engine (whose own `.config` is its JSON config)."""

    def __init__(self, forward, config: ImageDiffusionConfig):
        self.forward, self.config = forward, config

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class EMAState:
    """The EMA weights as the loop's after_step and extra_state; each checkpoint also gets diffusion_meta.json."""

    def __init__(self, ema: EMA, run_meta: dict):
        self.ema, self.run_meta = ema, run_meta

    def after_step(self, model, step: int) -> None:
        self.ema.update(model)

    def save(self, directory: Path) -> None:
        shadow = {name: tensor.detach().cpu().contiguous() for name, tensor in self.ema.shadow.items()}
        metadata = {"decay": repr(self.ema.decay), "warmup": str(self.ema.warmup),
                    "num_updates": str(self.ema.num_updates)}
        save_file(shadow, str(Path(directory) / EMA_FILE), metadata=metadata)
        (Path(directory) / DIFFUSION_META).write_text(json.dumps(self.run_meta, indent=2) + "\n")

    def load(self, directory: Path) -> None:
        path = Path(directory) / EMA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory} has no {EMA_FILE}: resume from a checkpoint of "
                                    "pretrain_image_diffusion.py")
        with safe_open(str(path), framework="pt") as opened:
            metadata = opened.metadata()
        self.ema.load_state_dict({"decay": float(metadata["decay"]), "warmup": metadata["warmup"] == "True",
                                  "num_updates": int(metadata["num_updates"]), "shadow": load_file(str(path))})


def load_diffusion_checkpoint(checkpoint, use_ema: bool = True,
                              device: torch.device | str = "cpu") -> tuple[DiT, dict]:
    """The eval-mode DiT of a pretrain_image_diffusion.py checkpoint (its EMA weights, or the trained ones) and
    the checkpoint's diffusion_meta.json (VAE checkpoint, latent scale factor, text encoder)."""
    checkpoint = Path(checkpoint)
    files = ("config.yaml", EMA_FILE if use_ema else "model.safetensors", DIFFUSION_META)
    missing = [name for name in files if not (checkpoint / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{checkpoint} has no {', '.join(missing)}: pass a checkpoint directory written by "
                                "pretrain_image_diffusion.py (runs/RUN_NAME/checkpoint-STEP)")
    model = build_image_diffusion(ImageDiffusionConfig.from_yaml(checkpoint / "config.yaml"))
    load_weights(model, checkpoint / files[1])
    meta = json.loads((checkpoint / DIFFUSION_META).read_text())
    return model.to(device).eval().requires_grad_(False), meta


def sample_grid(model, vae: ImageVAE, text_emb: torch.Tensor, text_mask: torch.Tensor, scale_factor: float,
                guidance_scales, steps: int | None, seed: int = SAMPLE_SEED) -> torch.Tensor:
    """Decoded samples for P prompts (text_emb: (P, L, D), text_mask: (P, L)) at each guidance scale, from the same
    noise: (3, G * H, P * W) float32 in [0, 1], one row per guidance scale."""
    config, device = model.config, text_emb.device
    shape = (text_emb.shape[0], config.latent_channels, config.latent_height, config.latent_width)
    rows = []
    for guidance_scale in guidance_scales:
        generator = torch.Generator(device=device).manual_seed(seed)
        latents = sample(model, shape, text_emb, text_mask, guidance_scale=guidance_scale, steps=steps,
                         generator=generator)
        images = vae.decode(latents / scale_factor).float().clamp(-1, 1)
        rows.append(torch.cat(list(images), dim=-1))
    return (torch.cat(rows, dim=-2) + 1) / 2


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
    ema = EMA(model, decay=config.ema_decay).to(device)
    state = EMAState(ema, {
        "made_by": "pretrain_image_diffusion.py", "vae_checkpoint": str(Path(args.vae_checkpoint).resolve()),
        "vae_config": vae.config.to_dict(), "latent_scale_factor": scale_factor,
        "latent_shape": train_cache.meta["latent_shape"], "image_size": train_cache.meta["image_size"],
        "text_encoder": train_cache.meta["text_encoder"], "train_data_dir": str(Path(train_cache.directory).resolve())})

    def train_batch(i: int) -> dict:
        return {**train.batch(i), "index": torch.tensor(i)}

    def loss(forward, batch: dict, step: int) -> LossTerms:
        generator = torch.Generator(device=device).manual_seed(micro_batch_seed(args.seed, context.rank,
                                                                                int(batch["index"])))
        latents = sample_latents(batch, scale_factor, generator)
        value, logs = diffusion_loss(_Denoiser(forward, config), latents, batch["text_emb"], batch["text_mask"],
                                     generator=generator)
        return LossTerms(value, logs=logs)

    def measure(eval_model, batch: dict) -> dict:
        generator = torch.Generator(device=device).manual_seed(EVAL_SEED + int(batch["index"]))
        latents = sample_latents(batch, scale_factor, generator)
        value, logs = diffusion_loss(eval_model, latents, batch["text_emb"], batch["text_mask"], generator=generator,
                                     cfg_dropout=0.0)
        return {"loss": value, "mse": logs["mse"]}

    def evaluate(eval_model) -> dict:
        metrics = {f"eval/{name}": value for name, value in evaluate_means(eval_model, val, measure, device).items()}
        with ema.swapped_into(eval_model):
            metrics["eval/ema_loss"] = evaluate_means(eval_model, val, measure, device)["loss"]
        return metrics

    @torch.no_grad()
    def samples(eval_model) -> dict:
        was_training = eval_model.training
        eval_model.eval()
        with ema.swapped_into(eval_model):
            grid = sample_grid(eval_model, vae, prompt_emb, prompt_mask, scale_factor, args.sample_guidance_scales,
                               args.sample_steps)
        eval_model.train(was_training)
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
