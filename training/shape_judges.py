"""Judges of images of builtin:shapes (data/builtin_shapes.py): which colours an image's shape and background
have, and how often they are the ones a prompt named; shared by bench/caption_fidelity.py (an image diffusion run)
and bench/wm_shapes_eval.py (the world model).

    found = classify_colors(image)                # ImageColors: shape / background palette names, median RGBs
    rows = score([found, ...], specs)             # shares of images whose shape / background has the spec's colour
    specs = prompt_specs(4)                       # 4 validation specs per palette colour, distinct file names
    real, reconstructed = real_and_reconstructed_colors(specs, 32, vae)   # the classifier's and pipeline's ceilings

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
"""

import dataclasses
from collections import Counter

import numpy as np
import torch
from PIL import Image

from data.builtin_shapes import PALETTE, ShapeSpec, draw_shape, shape_specs
from model.image.pipeline import decode_pixels, encode_pixels, slug

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
    captions give distinct slug file names (generate_image.py's)."""
    if specs_per_color < 1:
        raise ValueError(f"--specs_per_color must be at least 1, got {specs_per_color}")
    chosen, slugs = {name: [] for name in COLOR_NAMES}, set()
    for count, (_, spec) in enumerate(shape_specs("validation")):
        if count >= MAX_VALIDATION_SPECS:
            raise ValueError(f"found too few validation specs with distinct captions for {specs_per_color} per "
                             "colour: ask for fewer --specs_per_color")
        name = slug(spec.caption)
        if len(chosen[spec.color]) < specs_per_color and name not in slugs:
            chosen[spec.color].append(spec)
            slugs.add(name)
        if all(len(specs) == specs_per_color for specs in chosen.values()):
            return [spec for name in COLOR_NAMES for spec in chosen[name]]



@torch.no_grad()
def real_and_reconstructed_colors(specs: list[ShapeSpec], image_size: int, vae) -> tuple[list, list]:
    """Colours of the real images of specs (drawn at image_size) and of their VAE reconstructions (posterior means
    decoded)."""
    real = np.stack([np.asarray(draw_shape(spec, image_size)) for spec in specs])
    reconstructed = decode_pixels(vae, encode_pixels(vae, torch.from_numpy(real)))
    return [classify_colors(image) for image in real], [classify_colors(image) for image in reconstructed]
