"""Pretrain an image VAE (LDM's AutoencoderKL, optionally with a PatchGAN) on cached images, in one process or
under DeepSpeed.

    python preprocess_image_vae_dataset.py --dataset_name builtin:shapes --split train \\
        --output_dir cached_datasets/image_train_cached
    python preprocess_image_vae_dataset.py --dataset_name builtin:shapes --split validation \\
        --output_dir cached_datasets/image_val_cached
    python pretrain_image_vae.py --run_name image_vae_run --config gan_4_2 \\
        --train_data_dir cached_datasets/image_train_cached --val_data_dir cached_datasets/image_val_cached
    deepspeed --num_gpus=2 pretrain_image_vae.py --use_deepspeed --bf16 --run_name image_vae_run --config gan_4_2

--config names configs/image_vae/*.yaml (or a YAML path); --set KEY=VALUE overrides a field. A config with
use_discriminator trains the PatchGAN from its disc_start_step (or --disc_start_step) on, at --discriminator_lr.
Defaults follow LDM's autoencoder training: Adam betas (0.5, 0.9) without weight decay and a learning rate of
4.5e-6 per image of the global batch (batch_size x gradient_accumulation_steps x ranks), here with our warmup and
cosine schedule. Logged: train/reconstruction, kl, (adversarial, adaptive_weight, discriminator/...), and at each
evaluation eval/reconstruction (L1), eval/psnr, eval/ssim and a grid of validation images above their
reconstructions. Everything lands in runs/RUN_NAME/.
"""

import sys

from data.image_cache import open_image_caches
from model.image.vae import ImageVAEConfig, build_image_vae
from training.arguments import build_parser, check_arguments
from training.distributed import world_size
from training.image_vae_task import build_image_vae_task
from training.cli import finished_line, run_training

LDM_BASE_LEARNING_RATE = 4.5e-6  # per image of the global batch (LDM's scale_lr)


def parse_args(argv=None):
    parser = build_parser(__doc__)
    parser.set_defaults(max_steps=50_000, learning_rate=None, adam_beta1=0.5, adam_beta2=0.9, weight_decay=0.0,
                        eval_steps=500, save_steps=1000)
    parser.add_argument("--config", default="small_4_2", help="config name in configs/image_vae/ or a YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--train_data_dir", default="cached_datasets/image_train_cached",
                        help="written by preprocess_image_vae_dataset.py --split train")
    parser.add_argument("--val_data_dir", default="cached_datasets/image_val_cached",
                        help="written by preprocess_image_vae_dataset.py --split validation")
    parser.add_argument("--discriminator_lr", type=float, help="peak learning rate of the PatchGAN "
                                                               "(default: --learning_rate)")
    parser.add_argument("--disc_start_step", type=int,
                        help="optimizer step at which the GAN starts (default: the config's disc_start_step)")
    parser.add_argument("--generation_steps", type=int, help="reconstruction grids every N steps "
                                                             "(default: --eval_steps)")
    parser.add_argument("--sample_images", type=int, default=8, help="validation images in the reconstruction grid")
    args = parser.parse_args(argv)
    if args.learning_rate is None:
        global_batch = args.batch_size * args.gradient_accumulation_steps * world_size()
        args.learning_rate = LDM_BASE_LEARNING_RATE * global_batch
    if args.discriminator_lr is None:
        args.discriminator_lr = args.learning_rate
    return args


def check_image_vae_arguments(args) -> None:
    check_arguments(args)
    if args.discriminator_lr <= 0:
        raise ValueError(f"--discriminator_lr must be positive, got {args.discriminator_lr}")
    if args.disc_start_step is not None and args.disc_start_step < 0:
        raise ValueError(f"--disc_start_step must not be negative, got {args.disc_start_step}")
    for name in ("sample_images", "generation_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")


def resolve_config(args) -> ImageVAEConfig:
    """The named config with --set overrides and --disc_start_step (recorded in the run's config.yaml)."""
    config = ImageVAEConfig.from_name(args.config).with_overrides(args.set)
    if args.disc_start_step is not None:
        config = config.with_overrides([f"disc_start_step={args.disc_start_step}"])
    return config


def prepare(args):
    """The image VAE task builder and the closing report (training/cli.py)."""
    check_image_vae_arguments(args)
    config = resolve_config(args)
    train_cache, val_cache = open_image_caches(args.train_data_dir, args.val_data_dir, config)

    def build_task(context):
        return build_image_vae_task(build_image_vae(config), config, train_cache, val_cache, args, context)

    def report(summary: dict) -> str:
        size = train_cache.meta["image_size"]
        gan = f", discriminator from step {config.disc_start_step}" if config.use_discriminator else ""
        lines = [finished_line(summary, f"{summary['tokens']:,} images of {size}x{size}",
                               f"learning rate {args.learning_rate:.3g}{gan}")]
        if "eval/psnr" in summary:
            lines.append(f"validation: L1 {summary['eval/reconstruction']:.4f}, PSNR {summary['eval/psnr']:.2f} dB, "
                         f"SSIM {summary['eval/ssim']:.4f}")
        return "\n".join(lines)

    return build_task, report


def main(argv=None) -> int:
    return run_training(argv, parse_args, prepare)


if __name__ == "__main__":
    sys.exit(main())
