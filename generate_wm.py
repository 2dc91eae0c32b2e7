"""Generate with a multimodal world model of pretrain_wm.py: text -> images, images -> captions, or any mix.

    python generate_wm.py --run_dir runs/wm --prompt "a red circle" --output_dir out/        # writes PNGs
    python generate_wm.py --run_dir runs/wm --image in.png                                   # prints a caption
    python generate_wm.py --checkpoint runs/wm/checkpoint-2000 --image a.png --prompt "and a blue square"

--prompt and --image may repeat; they form one prompt in command-line order: [bos] then each text (tokenized)
or image (encoded by the run's VAE at the run's image size, bracketed by begin/end-of-image). A prompt that ends
with text is continued with an image (text-to-image: the prompt forces begin-of-image; --num_images samples, each
from its own seed); one that ends with an image is continued with text (a caption). Generation then goes on as
the model chooses (text on the KV cache, images sampled where it emits begin-of-image, at most --max_images more)
until it ends the sequence or --max_new_tokens. Generated text is printed; generated images are written to
OUTPUT_DIR/<number>-<index>.png. The VAE and tokenizer are the checkpoint's (wm_meta.json, tokenizer/);
--vae_checkpoint points at the VAE if it has moved (other weights are refused).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.image_latents import checkpoint_fingerprint
from data.image_sources import ImageRecord, load_image_item
from data.tokenizer import load_tokenizer
from model.multimodal.generation import MediaSegment, TextSegment, generate_multimodal
from training.checkpoints import checkpoint_from_args
from training.distributed import choose_device
from model.image.pipeline import load_vae_checkpoint
from model.pretrained import load_pretrained

WM_META, TOKENIZER_DIR = "wm_meta.json", "tokenizer"


class AppendSegment(argparse.Action):
    """--prompt and --image append (kind, value) to args.segments, keeping the command line's order."""

    def __call__(self, parser, namespace, value, option_string=None):
        segments = getattr(namespace, "segments", None) or []
        segments.append((self.dest, value))
        namespace.segments = segments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", help="a run of pretrain_wm.py with a multimodal config (its newest checkpoint)")
    parser.add_argument("--checkpoint", help="a checkpoint directory, or its name inside --run_dir")
    parser.add_argument("--prompt", action=AppendSegment, help="text of the prompt (repeatable)")
    parser.add_argument("--image", action=AppendSegment, help="an image file in the prompt (repeatable)")
    parser.add_argument("--num_images", type=int, default=1, help="samples of a prompt that ends with text")
    parser.add_argument("--max_images", type=int, default=1, help="images generated per sample at most")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--guidance_scale", type=float, help="classifier-free guidance (default: the config's)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the config's sampling_steps)")
    parser.add_argument("--temperature", type=float, help="sample text at this temperature (default: greedy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="generated_wm")
    parser.add_argument("--vae_checkpoint", help="the VAE (default: the run's)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.set_defaults(segments=[])
    return parser


def check_arguments(args) -> None:
    if not args.segments:
        raise ValueError("give at least one --prompt or --image")
    for name in ("num_images", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.max_images < 0:
        raise ValueError(f"--max_images must not be negative, got {args.max_images}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.temperature is not None and args.temperature <= 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature}")


def load_run(checkpoint: Path, vae_checkpoint: str | None, device: torch.device):
    """(model, VAE, tokenizer, wm_meta) of a checkpoint; a VAE with other weights than the run's is refused."""
    meta_path = checkpoint / WM_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no {WM_META}: pass a checkpoint of pretrain_wm.py with a multimodal "
                                "config (runs/RUN_NAME/checkpoint-STEP)")
    meta = json.loads(meta_path.read_text())
    vae_dir = Path(vae_checkpoint or meta["vae_checkpoint"])
    if not (vae_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"the run's VAE checkpoint {vae_dir} is gone: pass --vae_checkpoint its new place")
    if checkpoint_fingerprint(vae_dir) != meta["vae_fingerprint"]:
        raise ValueError(f"the VAE {vae_dir} is not the one {checkpoint} was trained with ({meta['vae_checkpoint']}): "
                         "pass that checkpoint as --vae_checkpoint")
    vae, _ = load_vae_checkpoint(vae_dir, device=device)
    return load_pretrained(checkpoint, device, family="multimodal"), vae, load_tokenizer(str(checkpoint / TOKENIZER_DIR)), meta


@torch.no_grad()
def encode_image(path: str, vae, meta: dict, device: torch.device) -> torch.Tensor:
    """An image file → its scaled posterior-mean latents (C, h, w), at the run's image size."""
    item, skip = load_image_item(ImageRecord(source_id=path, path=path), meta["image_size"])
    if item is None:
        raise ValueError(f"--image {path}: {skip['reason']}")
    pixels = item["image"][None].to(device).float() / 127.5 - 1.0
    return vae.encode(pixels).mean[0] * meta["media"]["image"]["latent_scale_factor"]


@torch.no_grad()
def generate(args) -> tuple[list[str], list[Path]]:
    """Run the prompt; returns (generated texts, written image paths)."""
    check_arguments(args)
    device = choose_device(args.device)
    model, vae, tokenizer, meta = load_run(checkpoint_from_args(args, "pretrain_wm.py"), args.vae_checkpoint, device)
    config, scale = model.config, meta["media"]["image"]["latent_scale_factor"]
    prompt = [TextSegment([config.bos_token_id])]
    for kind, value in args.segments:
        if kind == "image":
            prompt.append(MediaSegment("image", encode_image(value, vae, meta, device)))
        else:
            prompt.append(TextSegment(tokenizer(value, add_special_tokens=False)["input_ids"]))
    ends_with_text = args.segments[-1][0] == "prompt"
    if ends_with_text:
        prompt.append(TextSegment([config.begin_token_id("image")]))
    output_dir = Path(args.output_dir)
    texts, written = [], []
    for number in range(args.num_images if ends_with_text else 1):
        generator = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + number)
        segments = generate_multimodal(model, prompt, max_new_tokens=args.max_new_tokens,
                                       do_sample=args.temperature is not None, temperature=args.temperature or 1.0,
                                       guidance_scale=args.guidance_scale, steps=args.steps,
                                       max_media=args.max_images, generator=generator)
        images = 0
        for segment in segments:
            if isinstance(segment, TextSegment):
                texts.append(tokenizer.decode(segment.token_ids, skip_special_tokens=True))
                continue
            pixels = (vae.decode(segment.latents[None] / scale).float().clamp(-1, 1)[0] + 1) * 127.5
            output_dir.mkdir(parents=True, exist_ok=True)
            path = output_dir / f"{number}-{images}.png"
            Image.fromarray(np.ascontiguousarray(pixels.round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())).save(path)
            written.append(path)
            images += 1
    return texts, written


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        texts, paths = generate(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for text in texts:
        print(text)
    for path in paths:
        print(path)
    if paths:
        print(f"\n{len(paths)} image(s) written to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
