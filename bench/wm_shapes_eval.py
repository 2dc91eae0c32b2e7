"""Captioning and text-to-image of a multimodal world-model run trained on builtin:shapes.

    python bench/wm_shapes_eval.py --run_dir runs/shapes_wm --captions 200 --guidance_scales 1 2 4

Captioning: the first --captions builtin:shapes validation images (drawn at the run's image size, encoded by the
run's VAE: posterior mean times the latent scale factor) are captioned greedily (generate_wm's path: text after
[bos] begin-image span end-image). A caption names the right shape when its first shape word (SHAPES) is the
image's, and the right colour when the word before that shape word is the image's shape colour (every caption
template of builtin:shapes puts the colour right before the shape). The blind baseline answers every image with
the most common image caption of the run's training cache (a text-only model's best constant guess).

Text-to-image: bench/caption_fidelity.py's measurement on the world model: the captions of --specs_per_color
validation specs per palette colour, --num_images images each at every guidance scale (prompt [bos] caption
begin-image, seed fixed per image), decoded by the VAE, the shape colour read by training/shape_judges.py's
classify_colors;
the real images and their VAE reconstructions give the ceilings. Prints both tables and writes OUTPUT_DIR/
wm_eval.json (default <run dir>/wm_eval/).
"""

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import measure_and_report  # noqa: E402
from data.builtin_shapes import PALETTE, SHAPES, draw_shape, shape_specs  # noqa: E402
from data.multimodal_batches import item_kind  # noqa: E402
from data.multimodal_run import load_run  # noqa: E402
from data.sharded_cache import ShardedCache  # noqa: E402
from model.image.pipeline import decode_pixels, encode_pixels  # noqa: E402
from model.multimodal.generation import caption_media, text_to_media  # noqa: E402
from training.checkpoints import checkpoint_from_args  # noqa: E402
from training.distributed import choose_device  # noqa: E402
from training.shape_judges import (COLOR_NAMES, classify_colors, prompt_specs,  # noqa: E402
                                   real_and_reconstructed_colors, score)

WORD = re.compile(r"[a-z]+")


def named_attributes(caption: str) -> tuple[str | None, str | None]:
    """(colour, shape) a caption names: its first shape word and the colour word right before it."""
    words = WORD.findall(caption.lower())
    for index, word in enumerate(words):
        if word in SHAPES:
            before = words[index - 1] if index else None
            return (before if before in PALETTE else None), word
    return None, None


def most_common_image_caption(items) -> str:
    """The most common caption of the image items (clips' transcripts and text items do not count)."""
    counts = Counter(item["caption"] for item in items if item_kind(item) == "image")
    if not counts:
        raise ValueError("the run's training cache holds no captioned images: pass a run trained with images")
    return counts.most_common(1)[0][0]


def caption_accuracy(captions: list[str], specs) -> dict:
    named = [named_attributes(caption) for caption in captions]
    color = [found[0] == spec.color for found, spec in zip(named, specs)]
    shape = [found[1] == spec.shape for found, spec in zip(named, specs)]
    return {"images": len(specs), "color": float(np.mean(color)), "shape": float(np.mean(shape)),
            "both": float(np.mean([c and s for c, s in zip(color, shape)]))}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", help="a run of pretrain_wm.py with a multimodal config (its newest checkpoint)")
    parser.add_argument("--checkpoint", help="a checkpoint directory, or its name inside --run_dir")
    parser.add_argument("--captions", type=int, default=200, help="validation images to caption")
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--specs_per_color", type=int, default=4, help="validation captions per palette colour")
    parser.add_argument("--num_images", type=int, default=4, help="images per prompt and guidance scale")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the config's sampling_steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", help="default: <run dir>/wm_eval")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    return parser


@torch.no_grad()
def measure(args) -> dict:
    device = choose_device(args.device)
    checkpoint = checkpoint_from_args(args, "pretrain_wm.py")
    model, vae, _, tokenizer, meta = load_run(checkpoint, device)
    size, scale = meta["image_size"], meta["media"]["image"]["latent_scale_factor"]

    specs = [spec for _, spec in zip(range(args.captions), (spec for _, spec in shape_specs("validation")))]
    pixels = torch.from_numpy(np.stack([np.asarray(draw_shape(spec, size)) for spec in specs]))
    latents = encode_pixels(vae, pixels) * scale
    captions = [tokenizer.decode(caption_media(model, row), skip_special_tokens=True) for row in latents]
    train_cache = ShardedCache(meta["train_data_dir"])
    common = most_common_image_caption(train_cache)
    captioning = {"world model": caption_accuracy(captions, specs),
                  f"blind: most common training caption ({common!r})": caption_accuracy([common] * len(specs), specs)}

    prompts = prompt_specs(args.specs_per_color)
    real, reconstructed = real_and_reconstructed_colors(prompts, size, vae)
    drawing = {"real validation images": score(real, prompts), "VAE reconstructions": score(reconstructed, prompts)}
    output_dir = Path(args.output_dir or checkpoint.parent / "wm_eval")
    repeated = [spec for spec in prompts for _ in range(args.num_images)]
    for guidance_scale in args.guidance_scales:
        found, folder = [], output_dir / f"guidance_{guidance_scale:g}"
        folder.mkdir(parents=True, exist_ok=True)
        for number, spec in enumerate(repeated):
            generator = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + number)
            ids = tokenizer(spec.caption, add_special_tokens=False)["input_ids"]
            image = text_to_media(model, ids, guidance_scale=guidance_scale, steps=args.steps, generator=generator)
            array = decode_pixels(vae, image[None] / scale)[0]
            if number % args.num_images == 0:
                Image.fromarray(np.ascontiguousarray(array)).save(folder / f"{number // args.num_images:03d}.png")
            found.append(classify_colors(array))
        drawing[f"generated, guidance {guidance_scale:g}"] = score(found, repeated)
    return {"checkpoint": str(checkpoint.resolve()), "output_dir": str(output_dir), "image_size": size,
            "captions": {"results": captioning, "examples": [[spec.caption, caption] for spec, caption in
                                                             zip(specs[:10], captions[:10])]},
            "text_to_image": {"prompts": len(prompts), "num_images": args.num_images, "steps": args.steps,
                              "chance": 1 / len(COLOR_NAMES), "results": drawing}}


def print_report(report: dict, path: Path) -> None:
    print(f"\ncaptioning of {report['captions']['results']['world model']['images']} validation images "
          f"({report['checkpoint']})")
    print(f"{'captioner':<70} {'colour':>7} {'shape':>7} {'both':>7}")
    for name, row in report["captions"]["results"].items():
        print(f"{name:<70} {row['color']:>7.1%} {row['shape']:>7.1%} {row['both']:>7.1%}")
    for truth, caption in report["captions"]["examples"]:
        print(f"  {truth}  →  {caption}")
    print(f"\ntext to image: {report['text_to_image']['prompts']} captions x {report['text_to_image']['num_images']} "
          "images, share whose shape has the caption's colour")
    for name, row in report["text_to_image"]["results"].items():
        print(f"{name:<28} {row['shape_color']:>7.1%}  (background {row['background_color']:.1%}, no shape "
              f"{row['no_shape']:.1%}, n={row['images']})")
    print(f"chance (1/{len(COLOR_NAMES)}) {1 / len(COLOR_NAMES):.1%}\nwritten: {path}")


def main(argv=None) -> int:
    return measure_and_report(build_parser(), measure,
                              lambda args, report: Path(report["output_dir"]) / "wm_eval.json", print_report, argv)


if __name__ == "__main__":
    sys.exit(main())
