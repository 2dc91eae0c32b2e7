"""Generate with a multimodal world model of pretrain_wm.py: text -> images or speech, images -> captions, speech
-> text, or any mix.

    python generate_wm.py --run_dir runs/wm --prompt "a red circle" --output_dir out/        # writes PNGs
    python generate_wm.py --run_dir runs/wm --image in.png                                   # prints a caption
    python generate_wm.py --run_dir runs/wm --audio in.wav                                   # prints a transcript
    python generate_wm.py --run_dir runs/wm --prompt "red box seven" --speaker ref.wav       # writes a wav
    python generate_wm.py --checkpoint runs/wm/checkpoint-2000 --image a.png --prompt "and a blue square"

--prompt, --image and --audio may repeat; they form one prompt in command-line order: [bos] then each text
(tokenized), image (encoded by the run's VAE at the run's image size) or recording (resampled, padded with silence
to the run's clip length, encoded by the run's audio VAE or as log-mel frames, with its speaker embedding), each
medium bracketed by its begin/end tokens. A prompt that ends with text is continued with an image or, with
--speaker (or --continue_with audio), with speech in the voice of the --speaker recording (text-to-image or
text-to-speech: the prompt forces the begin token; --num_samples samples, each from its own seed); one that ends
with an image or a recording is continued with text (a caption, a transcript). Generation then goes on as the
model chooses (text on the KV cache, media sampled where it emits a begin token, at most --max_media more) until
it ends the sequence or --max_new_tokens. Generated text is printed; generated images are written to
OUTPUT_DIR/<number>-<index>.png and speech to OUTPUT_DIR/<number>-<index>.wav (vocoded by --vocoder_checkpoint,
or Griffin-Lim without one, and cut after its last sound: a clip's padding is silence). The encoders and tokenizer
are the checkpoint's (wm_meta.json, tokenizer/); --vae_checkpoint and --audio_vae_checkpoint point at the VAEs if
they have moved (other weights are refused).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import soundfile
import torch
from PIL import Image

from data.image_sources import ImageRecord, load_image_item
from data.multimodal_run import load_run
from model.image.pipeline import decode_pixels
from model.multimodal.generation import MediaSegment, TextSegment, generate_multimodal
from training.checkpoints import checkpoint_from_args
from training.distributed import choose_device

class AppendSegment(argparse.Action):
    """--prompt, --image and --audio append (kind, value) to args.segments, keeping the command line's order."""

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
    parser.add_argument("--audio", action=AppendSegment, help="a recording in the prompt (repeatable)")
    parser.add_argument("--speaker", help="a recording of the voice for generated speech")
    parser.add_argument("--continue_with", choices=("image", "audio"),
                        help="what a prompt that ends with text is continued with (default: audio with --speaker "
                             "or for a model without images, else image)")
    parser.add_argument("--num_samples", "--num_images", type=int, default=1,
                        help="samples of a prompt that ends with text")
    parser.add_argument("--max_media", "--max_images", type=int, default=1,
                        help="images or clips generated per sample at most")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--guidance_scale", type=float, help="classifier-free guidance (default: the config's)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the config's sampling_steps)")
    parser.add_argument("--temperature", type=float, help="sample text at this temperature (default: greedy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="generated_wm")
    parser.add_argument("--vae_checkpoint", help="the image VAE (default: the run's)")
    parser.add_argument("--audio_vae_checkpoint", help="the audio VAE (default: the run's)")
    parser.add_argument("--vocoder_checkpoint", help="a pretrain_vocoder.py checkpoint (default: Griffin-Lim)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.set_defaults(segments=[])
    return parser


def check_arguments(args) -> None:
    if not args.segments:
        raise ValueError("give at least one --prompt, --image or --audio")
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.max_media < 0:
        raise ValueError(f"--max_media must not be negative, got {args.max_media}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.temperature is not None and args.temperature <= 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature}")


def _need(medium, kind: str, flag: str, model) -> None:
    if medium is None:
        raise ValueError(f"{flag} needs a model with {kind}, but this one models "
                         f"{', '.join(['text'] + model.config.media_kinds)}")


@torch.no_grad()
def encode_image(path: str, vae, meta: dict, device: torch.device) -> torch.Tensor:
    """An image file → its scaled posterior-mean latents (C, h, w), at the run's image size."""
    item, skip = load_image_item(ImageRecord(source_id=path, path=path), meta["image_size"])
    if item is None:
        raise ValueError(f"--image {path}: {skip['reason']}")
    pixels = item["image"][None].to(device).float() / 127.5 - 1.0
    return vae.encode(pixels).mean[0] * meta["media"]["image"]["latent_scale_factor"]


def build_prompt(args, model, vae, codec, tokenizer, meta: dict, device: torch.device) -> tuple[list, dict, bool]:
    """The prompt segments of the command line → (segments, conditions for generated spans, ends with text). The
    voice of generated speech is --speaker's, else that of the prompt's last recording."""
    config = model.config
    voiced = bool(config.media.get("audio", {}).get("speaker_embedding_dim"))
    prompt, voice = [TextSegment([config.bos_token_id])], None
    for kind, value in args.segments:
        if kind == "image":
            _need(vae, "images", "--image", model)
            prompt.append(MediaSegment("image", encode_image(value, vae, meta, device)))
        elif kind == "audio":
            _need(codec, "audio", "--audio", model)
            frames, voice = codec.read(value)
            prompt.append(MediaSegment("audio", frames, voice if voiced else None))
        else:
            prompt.append(TextSegment(tokenizer(value, add_special_tokens=False)["input_ids"]))
    if args.speaker:
        _need(codec, "audio", "--speaker", model)
        voice = codec.read_speaker(args.speaker)
    ends_with_text = args.segments[-1][0] == "prompt"
    if ends_with_text:
        continue_with = args.continue_with or ("audio" if args.speaker or vae is None else "image")
        _need(codec if continue_with == "audio" else vae, continue_with, f"--continue_with {continue_with}", model)
        if continue_with == "audio" and voiced and voice is None:
            raise ValueError("this model speaks in a given voice: pass --speaker ref.wav (a recording of it)")
        prompt.append(TextSegment([config.begin_token_id(continue_with)]))
    return prompt, ({"audio": voice} if voiced and voice is not None else {}), ends_with_text


@torch.no_grad()
def generate(args) -> tuple[list[str], list[Path]]:
    """Run the prompt; returns (generated texts, written image and wav paths)."""
    check_arguments(args)
    device = choose_device(args.device)
    model, vae, codec, tokenizer, meta = load_run(checkpoint_from_args(args, "pretrain_wm.py"), device,
                                                  args.vae_checkpoint, args.audio_vae_checkpoint,
                                                  args.vocoder_checkpoint)
    prompt, conditions, ends_with_text = build_prompt(args, model, vae, codec, tokenizer, meta, device)
    output_dir = Path(args.output_dir)
    texts, written = [], []
    for number in range(args.num_samples if ends_with_text else 1):
        generator = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + number)
        segments = generate_multimodal(model, prompt, max_new_tokens=args.max_new_tokens,
                                       do_sample=args.temperature is not None, temperature=args.temperature or 1.0,
                                       guidance_scale=args.guidance_scale, steps=args.steps,
                                       max_media=args.max_media,
                                       generator=generator, conditions=conditions)
        for index, segment in enumerate(segment for segment in segments if isinstance(segment, MediaSegment)):
            output_dir.mkdir(parents=True, exist_ok=True)
            written.append(_write_media(segment, vae, codec, meta, output_dir / f"{number}-{index}"))
        texts += [tokenizer.decode(segment.token_ids, skip_special_tokens=True) for segment in segments
                  if isinstance(segment, TextSegment)]
    return texts, written


def _write_media(segment: MediaSegment, vae, codec, meta: dict, stem: Path) -> Path:
    """One generated image (PNG) or clip (wav) → its path."""
    if segment.kind == "audio":
        path = stem.with_suffix(".wav")
        soundfile.write(str(path), codec.waveform(segment.latents, segment.condition).numpy(), codec.sample_rate)
        return path
    pixels = decode_pixels(vae, segment.latents[None] / meta["media"]["image"]["latent_scale_factor"])[0]
    path = stem.with_suffix(".png")
    Image.fromarray(np.ascontiguousarray(pixels)).save(path)
    return path


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
        print(f"\n{len(paths)} file(s) written to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
