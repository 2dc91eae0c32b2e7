"""Generate images from a pretrain_image_diffusion.py run: prompts -> text encoder -> DiT sampling -> VAE -> PNG.

    python generate_image.py --run_dir runs/RUN --prompt "a red circle" --num_images 4 --guidance_scale 4 \\
        --steps 50 --seed 0 --output_dir out/
    python generate_image.py --run_dir runs/RUN --checkpoint checkpoint-5000 --prompt "a blue star" "a green square"
    python generate_image.py --checkpoint runs/RUN/checkpoint-5000 --prompt "a red circle" --no_ema

The newest checkpoint of --run_dir is used unless --checkpoint names one; its EMA weights unless --no_ema. The VAE
and the text encoder are the ones the run recorded (checkpoint-STEP/diffusion_meta.json); --vae_checkpoint
points at the VAE if it has moved. Files are OUTPUT_DIR/<prompt slug>-<index>.png; the same --seed gives the same
images (prompt p draws its noise from a generator seeded by the seed and p).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.diffusion.samplers import SAMPLERS
from model.image.pipeline import load_diffusion_checkpoint, load_vae_checkpoint, slug, text_to_images
from model.text_encoders import text_encoder_from_description
from training.checkpoints import checkpoint_from_args
from training.distributed import choose_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", help="a run of pretrain_image_diffusion.py (its newest checkpoint)")
    parser.add_argument("--checkpoint", help="a checkpoint directory, or its name inside --run_dir")
    parser.add_argument("--prompt", nargs="+", required=True, help="one or more prompts")
    parser.add_argument("--num_images", type=int, default=4, help="images per prompt")
    parser.add_argument("--guidance_scale", type=float, help="classifier-free guidance (default: the config's)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the config's sampling_steps)")
    parser.add_argument("--sampler", choices=SAMPLERS, help="default: the config's (ddim/ddpm for VP objectives, "
                                                            "euler for flow matching)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="generated_images")
    parser.add_argument("--no_ema", action="store_true", help="use the trained weights instead of their EMA")
    parser.add_argument("--vae_checkpoint", help="the VAE that decodes the latents (default: the run's)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    return parser


def check_arguments(args) -> None:
    if args.num_images < 1:
        raise ValueError(f"--num_images must be at least 1, got {args.num_images}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.guidance_scale is not None and args.guidance_scale < 0:
        raise ValueError(f"--guidance_scale must not be negative, got {args.guidance_scale}")
    slugs = [slug(prompt) for prompt in args.prompt]
    repeated = sorted({name for name in slugs if slugs.count(name) > 1})
    if repeated:
        raise ValueError(f"prompts that give the same file names ({', '.join(repeated)}): make them differ")


@torch.no_grad()
def generate(args) -> list[Path]:
    """Write args.num_images PNGs per prompt; returns their paths."""
    check_arguments(args)
    checkpoint = checkpoint_from_args(args, "pretrain_image_diffusion.py")
    device = choose_device(args.device)
    model, meta = load_diffusion_checkpoint(checkpoint, use_ema=not args.no_ema, device=device)
    vae, _ = load_vae_checkpoint(args.vae_checkpoint or meta["vae_checkpoint"], device=device)
    encoder = text_encoder_from_description(meta["text_encoder"], device)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for prompt, pixels in text_to_images(model, vae, encoder, args.prompt, args.num_images,
                                         meta["latent_scale_factor"], args.seed, args.guidance_scale, args.steps,
                                         args.sampler):
        for number, image in enumerate(pixels):
            path = output_dir / f"{slug(prompt)}-{number}.png"
            Image.fromarray(np.ascontiguousarray(image)).save(path)
            written.append(path)
    return written


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths = generate(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    print(f"\n{len(paths)} image(s) from {len(args.prompt)} prompt(s) written to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
