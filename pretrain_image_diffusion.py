"""Pretrain a text-conditioned DiT on image-VAE latents (latent diffusion), in one process or under DeepSpeed.

    python preprocess_image_diffusion_dataset.py --output_dir cached_datasets/image_train_diffusion_latents \\
        --vae_checkpoint runs/image_vae_run/checkpoint-XXX --vae_config small
    python preprocess_image_diffusion_dataset.py --split validation \\
        --output_dir cached_datasets/image_val_diffusion_latents --vae_checkpoint runs/image_vae_run/checkpoint-XXX
    python pretrain_image_diffusion.py --run_name image_diffusion_run --diffusion_type small_dit \\
        --train_data_dir cached_datasets/image_train_diffusion_latents \\
        --val_data_dir cached_datasets/image_val_diffusion_latents --vae_checkpoint runs/image_vae_run/checkpoint-XXX
    deepspeed --num_gpus=2 pretrain_image_diffusion.py --use_deepspeed --bf16 --run_name image_diffusion_run ...
    python generate_image.py --run_dir runs/image_diffusion_run --prompt "a red circle" --output_dir out/

(checkpoint-XXX: the step of the VAE checkpoint that pretrain_image_vae.py wrote, e.g. checkpoint-1000.)

--diffusion_type (or --config) names configs/image_diffusion/*.yaml (or a YAML path); --set KEY=VALUE overrides a
field. The latent channels and grid and the text width come from the train cache (an override that disagrees
is an error). Defaults follow DiT: AdamW at 1e-4 without weight decay, betas (0.9, 0.999). The EMA of the weights
(decay --ema_decay, default the config's) is saved with each checkpoint as ema.safetensors and used for
eval/ema_loss, the sample grids and generate_image.py. Logged: train/loss (min-SNR weighted), mse, loss_weight,
cfg_dropped; eval/loss, eval/mse, eval/ema_loss on fixed validation latents and noise; every --generation_steps a
grid of samples for --sample_prompts (columns) at each of --sample_guidance_scales (rows), decoded by the VAE
(--vae_checkpoint, default the one the cache was written with). Everything lands in runs/RUN_NAME/.
"""

import sys

from data.latent_cache import open_latent_caches
from model.image.diffusion import build_image_diffusion
from model.image.pipeline import load_vae_checkpoint
from training.arguments import build_parser, check_arguments
from training.image_diffusion_task import DEFAULT_SAMPLE_PROMPTS, build_image_diffusion_task, resolve_diffusion_config
from training.cli import finished_line, run_training


def parse_args(argv=None):
    parser = build_parser(__doc__)
    parser.set_defaults(max_steps=100_000, learning_rate=1e-4, weight_decay=0.0, adam_beta2=0.999, eval_steps=1000,
                        save_steps=5000)
    parser.add_argument("--diffusion_type", "--config", dest="config", default="small_dit",
                        help="config name in configs/image_diffusion/ or a YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--train_data_dir", default="cached_datasets/image_train_diffusion_latents",
                        help="written by preprocess_image_diffusion_dataset.py --split train")
    parser.add_argument("--val_data_dir", default="cached_datasets/image_val_diffusion_latents",
                        help="written by preprocess_image_diffusion_dataset.py --split validation")
    parser.add_argument("--vae_checkpoint", help="the VAE that decodes the samples (default: the one recorded in the "
                                                 "train cache)")
    parser.add_argument("--ema_decay", type=float, help="EMA decay of the weights (default: the config's ema_decay)")
    parser.add_argument("--generation_steps", type=int, help="sample grids every N steps (default: --eval_steps)")
    parser.add_argument("--sample_prompts", nargs="+", help="prompts of the sample grid (default: a few "
                                                            "builtin:shapes-style captions)")
    parser.add_argument("--sample_guidance_scales", type=float, nargs="+", default=[1.0, 3.0, 6.0],
                        help="classifier-free guidance scales of the sample grid's rows")
    parser.add_argument("--sample_steps", type=int, help="sampler steps for the grid (default: the config's "
                                                         "sampling_steps)")
    args = parser.parse_args(argv)
    args.sample_prompts = args.sample_prompts or list(DEFAULT_SAMPLE_PROMPTS)
    return args


def check_diffusion_arguments(args) -> None:
    check_arguments(args)
    for name in ("generation_steps", "sample_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if min(args.sample_guidance_scales) < 0:
        raise ValueError(f"--sample_guidance_scales must not be negative, got {args.sample_guidance_scales}")
    if args.ema_decay is not None and not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in [0, 1), got {args.ema_decay}")


def prepare(args):
    """The image diffusion task builder and the closing report (training/cli.py)."""
    check_diffusion_arguments(args)
    train_cache, val_cache = open_latent_caches(args.train_data_dir, args.val_data_dir)
    overrides = args.set + ([f"ema_decay={args.ema_decay}"] if args.ema_decay is not None else [])
    config = resolve_diffusion_config(args.config, overrides, train_cache)
    if args.sample_steps is not None and args.sample_steps > config.num_train_timesteps:
        raise ValueError(f"--sample_steps must be at most num_train_timesteps={config.num_train_timesteps}")
    args.vae_checkpoint = args.vae_checkpoint or train_cache.meta["vae_checkpoint"]
    vae, _ = load_vae_checkpoint(args.vae_checkpoint)
    if vae.config.latent_channels != config.latent_channels:
        raise ValueError(f"VAE {args.vae_checkpoint} has {vae.config.latent_channels} latent channels but the "
                         f"cache holds {config.latent_channels}: pass the --vae_checkpoint the cache was "
                         f"written with ({train_cache.meta['vae_checkpoint']})")

    def build_task(context):
        return build_image_diffusion_task(build_image_diffusion(config), config, train_cache, val_cache,
                                          vae.to(context.device), args, context)

    def report(summary: dict) -> str:
        lines = [finished_line(summary, f"{summary['tokens']:,} images", f"DiT '{config.name}', latents "
                               f"{config.latent_channels}x{config.latent_height}x{config.latent_width}")]
        if "eval/loss" in summary:
            lines.append(f"validation loss {summary['eval/loss']:.4f} (EMA weights {summary['eval/ema_loss']:.4f}), "
                         f"mse {summary['eval/mse']:.4f}")
        lines.append(f"images: python generate_image.py --run_dir {summary['run_dir']} --prompt \"a red circle\"")
        return "\n".join(lines)

    return build_task, report


def main(argv=None) -> int:
    return run_training(argv, parse_args, prepare)


if __name__ == "__main__":
    sys.exit(main())
