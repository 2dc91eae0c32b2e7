"""Caption fidelity of an image diffusion run trained on builtin:shapes: does a generated shape have the colour
its prompt names?

    python bench/caption_fidelity.py --run_dir runs/shapes_dit --guidance_scales 1 4
    python bench/caption_fidelity.py --checkpoint runs/shapes_dit/checkpoint-3000 --specs_per_color 8 \\
        --num_images 4 --steps 25 --output_dir out/fidelity

Prompts are captions of builtin:shapes validation images, so they have the training captions' style ("a small red
circle at the top on a white background") and were never trained on: the first --specs_per_color validation
specs of each PALETTE colour (a spec whose generate_image.py file name would repeat an earlier one is skipped).
--num_images images per prompt are drawn as generate_image.py draws them (model/image/pipeline.text_to_images) from
the run's newest checkpoint (or --checkpoint, EMA weights unless --no_ema) with fixed --seed at each guidance
scale; the same prompt gets the same noise at every scale. The PNGs are kept under OUTPUT_DIR/guidance_<scale>/.

Colours are read by training/shape_judges.py's classify_colors (its docstring gives the method); an image
matches its prompt when its shape colour is the prompt's colour (the background match is reported too).

The same measurement on the real validation images of the same specs (drawn by data/builtin_shapes.draw_shape at
the run's image size) is the classifier's ceiling (it should be ~100%), on their VAE reconstructions the
pipeline's ceiling, and 1 / len(PALETTE) is what a guess gives. Prints a table and writes OUTPUT_DIR/fidelity.json
(default OUTPUT_DIR: <run dir>/caption_fidelity/).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import measure_and_report  # noqa: E402
from data.builtin_shapes import ShapeSpec  # noqa: E402
from model.image.pipeline import load_diffusion_checkpoint, load_vae_checkpoint, slug, text_to_images  # noqa: E402
from model.text_encoders import text_encoder_from_description  # noqa: E402
from training.checkpoints import checkpoint_from_args  # noqa: E402
from training.distributed import choose_device  # noqa: E402
from training.shape_judges import (COLOR_NAMES, ImageColors, classify_colors, prompt_specs,  # noqa: E402
                                   real_and_reconstructed_colors, score)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", help="a run of pretrain_image_diffusion.py (its newest checkpoint)")
    parser.add_argument("--checkpoint", help="a checkpoint directory, or its name inside --run_dir")
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 4.0],
                        help="classifier-free guidance scales to measure")
    parser.add_argument("--specs_per_color", type=int, default=4, help="validation captions per palette colour")
    parser.add_argument("--num_images", type=int, default=4, help="images per prompt and guidance scale")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the config's sampling_steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_ema", action="store_true", help="use the trained weights instead of their EMA")
    parser.add_argument("--output_dir", help="PNGs and fidelity.json (default: <run dir>/caption_fidelity)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    return parser


@torch.no_grad()
def generated_colors(args, model, vae, encoder, scale_factor: float, specs: list[ShapeSpec], guidance_scale: float,
                     output_dir: Path) -> list[ImageColors]:
    """Draw args.num_images per spec caption at guidance_scale with the run's DiT, VAE and text encoder, write them
    as generate_image.py names them (output_dir/<caption slug>-<index>.png); their colours, spec-major."""
    output_dir.mkdir(parents=True, exist_ok=True)
    found = []
    for prompt, pixels in text_to_images(model, vae, encoder, [spec.caption for spec in specs], args.num_images,
                                         scale_factor, args.seed, guidance_scale, args.steps):
        for number, image in enumerate(pixels):
            Image.fromarray(np.ascontiguousarray(image)).save(output_dir / f"{slug(prompt)}-{number}.png")
            found.append(classify_colors(image))
    return found


def measure(args) -> dict:
    """Run the measurement (see the module docstring); returns fidelity.json's contents."""
    if args.num_images < 1:
        raise ValueError(f"--num_images must be at least 1, got {args.num_images}")
    if min(args.guidance_scales) < 0:
        raise ValueError(f"--guidance_scales must not be negative, got {args.guidance_scales}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    checkpoint = checkpoint_from_args(args, "pretrain_image_diffusion.py")
    device = choose_device(args.device)
    model, meta = load_diffusion_checkpoint(checkpoint, use_ema=not args.no_ema, device=device)
    vae, _ = load_vae_checkpoint(meta["vae_checkpoint"], device=device)
    encoder = text_encoder_from_description(meta["text_encoder"], device)
    output_dir = Path(args.output_dir or checkpoint.parent / "caption_fidelity")
    specs = prompt_specs(args.specs_per_color)
    real, reconstructed = real_and_reconstructed_colors(specs, meta["image_size"], vae)
    rows = {"real validation images": score(real, specs), "VAE reconstructions": score(reconstructed, specs)}
    repeated = [spec for spec in specs for _ in range(args.num_images)]
    for scale in args.guidance_scales:
        found = generated_colors(args, model, vae, encoder, meta["latent_scale_factor"], specs, scale,
                                 output_dir / f"guidance_{scale:g}")
        rows[f"generated, guidance {scale:g}"] = {"guidance_scale": scale, **score(found, repeated)}
    return {"checkpoint": str(checkpoint.resolve()), "output_dir": str(output_dir), "image_size": meta["image_size"],
            "prompts": [spec.caption for spec in specs], "num_images": args.num_images, "seed": args.seed,
            "steps": args.steps, "ema": not args.no_ema, "chance": 1 / len(COLOR_NAMES), "results": rows}


def print_table(report: dict, path: Path) -> None:
    print(f"\ncaption fidelity of {report['checkpoint']} ({len(report['prompts'])} validation captions, "
          f"{report['num_images']} images each, {report['image_size']}x{report['image_size']})")
    print(f"{'images':<28} {'shape colour':>12} {'background':>11} {'no shape':>9} {'n':>5}")
    for name, row in report["results"].items():
        print(f"{name:<28} {row['shape_color']:>12.1%} {row['background_color']:>11.1%} {row['no_shape']:>9.1%} "
              f"{row['images']:>5}")
    print(f"{f'chance (1/{len(COLOR_NAMES)})':<28} {report['chance']:>12.1%} {report['chance']:>11.1%}")
    print(f"\nwritten: {path} and the PNGs under {report['output_dir']}/guidance_*/")


def main(argv=None) -> int:
    return measure_and_report(build_parser(), measure,
                              lambda args, report: Path(report["output_dir"]) / "fidelity.json", print_table, argv)


if __name__ == "__main__":
    sys.exit(main())
