"""How readable is the shape kind of builtin:shapes images, as pixels and as an image VAE's latents? The ceiling
of a captioner that reads the same inputs (bench/wm_shapes_eval.py scores the world model's captions).

    python bench/shape_probe.py --vae_checkpoint runs/shapes_wm_vae/checkpoint-1800 --train_images 4000

A small CNN classifier (7 shape kinds) is trained from scratch on the first --train_images training images of
builtin:shapes (at the VAE's image size) and scored on the first --val_images validation images, once on the
pixels and once on the VAE's posterior means (what the world model's image spans hold). Accuracy is also split
by the shape's size (small / medium / large), since a small shape covers only a few pixels of a 32x32 image.
The majority class (the most common training kind) is the blind baseline. Writes probe.json to --output_dir
(default: the VAE checkpoint's folder, shape_probe/).
"""

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import measure_and_report  # noqa: E402
from data.builtin_shapes import SHAPES, SIZES, draw_shape, shape_specs  # noqa: E402
from model.image.pipeline import encode_pixels, load_vae_checkpoint  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae_checkpoint", required=True, help="a pretrain_image_vae.py checkpoint directory")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--train_images", type=int, default=4000)
    parser.add_argument("--val_images", type=int, default=500)
    parser.add_argument("--steps", type=int, default=3000, help="classifier training steps (batch 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", help="default: <VAE checkpoint>/shape_probe")
    return parser


def first_specs(split: str, count: int) -> list:
    return [spec for _, (_, spec) in zip(range(count), shape_specs(split))]


def classifier(channels: int, side: int) -> nn.Module:
    """A CNN over (B, channels, side, side): three 3x3 conv layers (one stride 2 where side > 8), then a linear head
    over the flattened map."""
    stride = 2 if side > 8 else 1
    out_side = (side + stride - 1) // stride
    return nn.Sequential(
        nn.Conv2d(channels, 64, 3, padding=1), nn.GELU(),
        nn.Conv2d(64, 64, 3, stride=stride, padding=1), nn.GELU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.GELU(),
        nn.Flatten(), nn.Linear(64 * out_side * out_side, len(SHAPES)))


def train_and_score(train_x, train_y, val_x, val_y, steps: int, seed: int) -> np.ndarray:
    """Whether each validation input is classified right (bool array) after `steps` AdamW steps of batch 64."""
    torch.manual_seed(seed)
    mean, std = train_x.mean(dim=(0, 2, 3), keepdim=True), train_x.std(dim=(0, 2, 3), keepdim=True) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    model = classifier(train_x.shape[1], train_x.shape[-1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, len(train_x), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(train_x[rows]), train_y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        predicted = torch.cat([model(chunk).argmax(-1) for chunk in val_x.split(256)])
    return (predicted == val_y).numpy()


def by_size(correct: np.ndarray, specs) -> dict:
    sizes = np.array([spec.size for spec in specs])
    return {"all": float(correct.mean()), **{size: float(correct[sizes == size].mean()) for size in SIZES}}


@torch.no_grad()
def encode(vae, specs, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels (N, 3, size, size) in [-1, 1], VAE posterior means (N, C, h, w)) of the specs' images."""
    pixels = torch.from_numpy(np.stack([np.asarray(draw_shape(spec, size)) for spec in specs]))
    latents = torch.cat([encode_pixels(vae, chunk).cpu() for chunk in pixels.split(256)])
    return pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0, latents


def measure(args) -> dict:
    vae, _ = load_vae_checkpoint(args.vae_checkpoint)
    train_specs, val_specs = first_specs("train", args.train_images), first_specs("validation", args.val_images)
    train_y = torch.tensor([SHAPES.index(spec.shape) for spec in train_specs])
    val_y = torch.tensor([SHAPES.index(spec.shape) for spec in val_specs])
    train_pixels, train_latents = encode(vae, train_specs, args.image_size)
    val_pixels, val_latents = encode(vae, val_specs, args.image_size)
    majority = Counter(spec.shape for spec in train_specs).most_common(1)[0][0]
    results = {
        "pixels": by_size(train_and_score(train_pixels, train_y, val_pixels, val_y, args.steps, args.seed), val_specs),
        "VAE latents": by_size(train_and_score(train_latents, train_y, val_latents, val_y, args.steps, args.seed),
                               val_specs),
        f"blind: the most common training kind ({majority})":
            by_size(np.array([spec.shape == majority for spec in val_specs]), val_specs),
    }
    output_dir = Path(args.output_dir or Path(args.vae_checkpoint) / "shape_probe")
    return {"vae_checkpoint": str(Path(args.vae_checkpoint).resolve()), "output_dir": str(output_dir),
            "image_size": args.image_size, "train_images": args.train_images, "val_images": args.val_images,
            "steps": args.steps, "latent_shape": list(train_latents.shape[1:]), "results": results}


def print_report(report: dict, path: Path) -> None:
    print(f"\nshape kind ({len(SHAPES)} kinds) of {report['val_images']} validation images, a CNN trained on "
          f"{report['train_images']} train images for {report['steps']} steps; latents {report['latent_shape']}")
    print(f"{'input':<50} {'all':>7} " + " ".join(f"{size:>7}" for size in SIZES))
    for name, row in report["results"].items():
        print(f"{name:<50} {row['all']:>7.1%} " + " ".join(f"{row[size]:>7.1%}" for size in SIZES))
    print(f"written: {path}")


def main(argv=None) -> int:
    return measure_and_report(build_parser(), measure, lambda args, report: Path(report["output_dir"]) / "probe.json",
                              print_report, argv)


if __name__ == "__main__":
    sys.exit(main())
