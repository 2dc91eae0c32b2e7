"""Caption fidelity of an image diffusion run trained on builtin:shapes: does a generated shape have the colour
its prompt names?

    python bench/caption_fidelity.py --run_dir runs/shapes_dit --guidance_scales 1 4
    python bench/caption_fidelity.py --checkpoint runs/shapes_dit/checkpoint-3000 --specs_per_color 8 \\
        --num_images 4 --steps 25 --output_dir out/fidelity

Prompts are captions of builtin:shapes validation images, so they have the training captions' style ("a small red
circle at the top on a white background") and were never trained on: the first --specs_per_color validation
specs of each PALETTE colour (a spec whose generate_image.py file name would repeat an earlier one is skipped).
generate_image.generate draws --num_images images per prompt from the run's newest checkpoint (or --checkpoint,
EMA weights unless --no_ema) with fixed --seed at each guidance scale; the same prompt gets the same noise at
every scale. The PNGs are kept under OUTPUT_DIR/guidance_<scale>/.

Colour classifier (classify_colors), for an RGB image (H, W, 3):
1. background colour = the per-channel median of the border pixels (the outermost BORDER_PIXELS rows and columns;
   builtin:shapes keeps every shape inside the image, so the border is background but for antialiasing);
2. each pixel's Euclidean RGB distance from it; the shape = the pixels farther than half the largest distance
   (the core of the shape: antialiased edge pixels that are more background than shape fall below) and at least
   MIN_CONTRAST (about half the closest two palette colours, orange and yellow, 76 apart); no such pixel: no shape;
3. shape colour = the per-channel median m of the shape pixels, named by mixing: the PALETTE colour c (other than the
   background's) whose blend with the background, bg + a (c - bg) for a in [0, 1], passes nearest m. A small or
   blurred shape is such a blend (antialiasing: the smallest star at 32x32 has no pure pixel, and a yellow one on
   black is nearer orange than yellow), so its colour is still found. Colours whose blends pass within
   TIE_DISTANCE of the nearest are ambiguous (a gray shape on black is also a partly covering white one): of
   those, the one nearest m wins. The background colour is the PALETTE colour nearest bg.
An image matches its prompt when its shape colour is the prompt's colour (the background match is reported too).

The same measurement on the real validation images of the same specs (drawn by data/builtin_shapes.draw_shape at
the run's image size) is the classifier's ceiling (it should be ~100%), on their VAE reconstructions the
pipeline's ceiling, and 1 / len(PALETTE) is what a guess gives. Prints a table and writes OUTPUT_DIR/fidelity.json
(default OUTPUT_DIR: <run dir>/caption_fidelity/).
"""

import argparse
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import generate_image  # noqa: E402
from training.checkpoints import checkpoint_from_args  # noqa: E402
from data.builtin_shapes import PALETTE, ShapeSpec, draw_shape, shape_specs  # noqa: E402
from model.image.pipeline import load_diffusion_checkpoint, load_vae_checkpoint  # noqa: E402
from training.distributed import choose_device  # noqa: E402

BORDER_PIXELS = 1
MIN_CONTRAST = 32.0  # RGB distance (0-255 scale) below which a pixel counts as background
CORE_FRACTION = 0.5  # shape pixels are farther from the background than this fraction of the farthest pixel
TIE_DISTANCE = 16.0  # blends passing this close to the best one are ambiguous (RGB distance, 0-255 scale)
COLOR_NAMES = tuple(PALETTE)
PALETTE_RGB = np.array([PALETTE[name] for name in COLOR_NAMES], dtype=np.float64)  # (11, 3)
MAX_VALIDATION_SPECS = 100_000


@dataclasses.dataclass(frozen=True)
class ImageColors:
    """What classify_colors finds: palette names (shape None when no pixel stands out from the background), the
    median RGB colours, and the number of shape pixels."""

    shape: str | None
    background: str
    shape_rgb: tuple[float, float, float] | None
    background_rgb: tuple[float, float, float]
    shape_pixels: int


def nearest_palette_color(rgb) -> str:
    """The PALETTE name nearest (Euclidean RGB) to rgb: (3,) in 0-255."""
    rgb = np.asarray(rgb, dtype=np.float64)
    if rgb.shape != (3,):
        raise ValueError(f"an RGB colour has 3 values, got shape {rgb.shape}")
    return COLOR_NAMES[int(np.argmin(np.linalg.norm(PALETTE_RGB - rgb, axis=1)))]


def blended_palette_color(rgb, background_rgb) -> str:
    """The PALETTE name whose blend with the background passes nearest rgb (see the module docstring, step 3).
    rgb, background_rgb: (3,) in 0-255."""
    rgb, background_rgb = np.asarray(rgb, dtype=np.float64), np.asarray(background_rgb, dtype=np.float64)
    directions = PALETTE_RGB - background_rgb  # (11, 3)
    lengths = np.einsum("cd,cd->c", directions, directions)
    amounts = np.clip(directions @ (rgb - background_rgb) / np.maximum(lengths, 1e-9), 0.0, 1.0)
    misses = np.linalg.norm(background_rgb + amounts[:, None] * directions - rgb, axis=1)
    misses[COLOR_NAMES.index(nearest_palette_color(background_rgb))] = np.inf  # a shape never has the background's
    candidates = np.flatnonzero(misses <= misses.min() + TIE_DISTANCE)
    return COLOR_NAMES[candidates[np.argmin(np.linalg.norm(PALETTE_RGB[candidates] - rgb, axis=1))]]


def classify_colors(image) -> ImageColors:
    """The background and shape colours of image: (H, W, 3) uint8 RGB array or a PIL image (see the docstring)."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or min(pixels.shape[:2]) <= 2 * BORDER_PIXELS:
        raise ValueError(f"classify_colors takes an RGB image (H, W, 3) larger than {2 * BORDER_PIXELS} pixels a "
                         f"side, got shape {pixels.shape}; convert (3, H, W) tensors with .permute(1, 2, 0)")
    pixels = pixels.astype(np.float64)
    inner = np.zeros(pixels.shape[:2], dtype=bool)
    inner[BORDER_PIXELS:-BORDER_PIXELS, BORDER_PIXELS:-BORDER_PIXELS] = True
    background_rgb = np.median(pixels[~inner], axis=0)
    distance = np.linalg.norm(pixels - background_rgb, axis=2)
    shape = distance > max(MIN_CONTRAST, CORE_FRACTION * distance.max())
    background = nearest_palette_color(background_rgb)
    if not shape.any():
        return ImageColors(None, background, None, tuple(background_rgb.tolist()), 0)
    shape_rgb = np.median(pixels[shape], axis=0)
    return ImageColors(blended_palette_color(shape_rgb, background_rgb), background, tuple(shape_rgb.tolist()),
                       tuple(background_rgb.tolist()), int(shape.sum()))


def score(found: list[ImageColors], specs: list[ShapeSpec]) -> dict:
    """Shares of images whose shape / background colour is their spec's, overall and per prompt colour, and the
    confusion counts {prompt colour: {found colour or "none": count}}."""
    if len(found) != len(specs) or not specs:
        raise ValueError(f"score needs one spec per image and at least one, got {len(found)} images and "
                         f"{len(specs)} specs")
    shape_hits = [colors.shape == spec.color for colors, spec in zip(found, specs)]
    confusion = {name: Counter() for name in COLOR_NAMES}
    for colors, spec in zip(found, specs):
        confusion[spec.color][colors.shape or "none"] += 1
    per_color = {name: counts[name] / sum(counts.values()) for name, counts in confusion.items() if counts}
    return {"images": len(specs), "shape_color": sum(shape_hits) / len(specs),
            "background_color": sum(c.background == s.background for c, s in zip(found, specs)) / len(specs),
            "no_shape": sum(colors.shape is None for colors in found) / len(specs),
            "per_color": per_color, "confusion": {name: dict(counts) for name, counts in confusion.items() if counts}}


def prompt_specs(specs_per_color: int) -> list[ShapeSpec]:
    """The first specs_per_color builtin:shapes validation specs of each PALETTE colour (in palette order), whose
    captions give distinct generate_image.slug file names."""
    if specs_per_color < 1:
        raise ValueError(f"--specs_per_color must be at least 1, got {specs_per_color}")
    chosen, slugs = {name: [] for name in COLOR_NAMES}, set()
    for count, (_, spec) in enumerate(shape_specs("validation")):
        if count >= MAX_VALIDATION_SPECS:
            raise ValueError(f"found too few validation specs with distinct captions for {specs_per_color} per "
                             "colour: ask for fewer --specs_per_color")
        name = generate_image.slug(spec.caption)
        if len(chosen[spec.color]) < specs_per_color and name not in slugs:
            chosen[spec.color].append(spec)
            slugs.add(name)
        if all(len(specs) == specs_per_color for specs in chosen.values()):
            return [spec for name in COLOR_NAMES for spec in chosen[name]]


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


def generated_colors(args, checkpoint: Path, specs: list[ShapeSpec], guidance_scale: float,
                     output_dir: Path) -> list[ImageColors]:
    """Generate args.num_images per spec caption with generate_image.generate; their colours, spec-major
    (generate returns the paths prompt by prompt)."""
    argv = ["--checkpoint", str(checkpoint), "--prompt", *[spec.caption for spec in specs],
            "--num_images", str(args.num_images), "--guidance_scale", str(guidance_scale), "--seed", str(args.seed),
            "--output_dir", str(output_dir)]
    argv += (["--steps", str(args.steps)] if args.steps else []) + (["--no_ema"] if args.no_ema else [])
    argv += ["--device", args.device] if args.device else []
    paths = generate_image.generate(generate_image.build_parser().parse_args(argv))
    return [classify_colors(Image.open(path)) for path in paths]


@torch.no_grad()
def real_and_reconstructed_colors(specs: list[ShapeSpec], image_size: int, vae) -> tuple[list, list]:
    """Colours of the real images of specs and of their VAE reconstructions (posterior means decoded)."""
    real = [np.asarray(draw_shape(spec, image_size)) for spec in specs]
    device = next(vae.parameters()).device
    images = torch.from_numpy(np.stack(real)).permute(0, 3, 1, 2).to(device).float() / 127.5 - 1.0
    decoded = vae.decode(vae.encode(images).mean).float().clamp(-1, 1)
    pixels = ((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [classify_colors(image) for image in real], [classify_colors(image) for image in pixels]


def measure(args) -> dict:
    """Run the measurement (see the module docstring); returns fidelity.json's contents."""
    if args.num_images < 1:
        raise ValueError(f"--num_images must be at least 1, got {args.num_images}")
    if min(args.guidance_scales) < 0:
        raise ValueError(f"--guidance_scales must not be negative, got {args.guidance_scales}")
    checkpoint = checkpoint_from_args(args, "pretrain_image_diffusion.py")
    _, meta = load_diffusion_checkpoint(checkpoint)
    vae, _ = load_vae_checkpoint(meta["vae_checkpoint"], device=choose_device(args.device))
    output_dir = Path(args.output_dir or checkpoint.parent / "caption_fidelity")
    specs = prompt_specs(args.specs_per_color)
    real, reconstructed = real_and_reconstructed_colors(specs, meta["image_size"], vae)
    rows = {"real validation images": score(real, specs), "VAE reconstructions": score(reconstructed, specs)}
    repeated = [spec for spec in specs for _ in range(args.num_images)]
    for scale in args.guidance_scales:
        found = generated_colors(args, checkpoint, specs, scale, output_dir / f"guidance_{scale:g}")
        rows[f"generated, guidance {scale:g}"] = {"guidance_scale": scale, **score(found, repeated)}
    return {"checkpoint": str(checkpoint.resolve()), "output_dir": str(output_dir), "image_size": meta["image_size"],
            "prompts": [spec.caption for spec in specs], "num_images": args.num_images, "seed": args.seed,
            "steps": args.steps, "ema": not args.no_ema, "chance": 1 / len(COLOR_NAMES), "results": rows}


def print_table(report: dict) -> None:
    print(f"\ncaption fidelity of {report['checkpoint']} ({len(report['prompts'])} validation captions, "
          f"{report['num_images']} images each, {report['image_size']}x{report['image_size']})")
    print(f"{'images':<28} {'shape colour':>12} {'background':>11} {'no shape':>9} {'n':>5}")
    for name, row in report["results"].items():
        print(f"{name:<28} {row['shape_color']:>12.1%} {row['background_color']:>11.1%} {row['no_shape']:>9.1%} "
              f"{row['images']:>5}")
    print(f"{f'chance (1/{len(COLOR_NAMES)})':<28} {report['chance']:>12.1%} {report['chance']:>11.1%}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = measure(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    output_dir = Path(report["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwritten: {output_dir / 'fidelity.json'} and the PNGs under {output_dir}/guidance_*/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
