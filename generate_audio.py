"""Speak a prompt with a pretrain_audio_diffusion.py run: text (and a reference speaker) -> DiT -> log-mel
[-> audio VAE decoder] -> vocoder -> a wav file.

    python generate_audio.py --run_dir runs/RUN --prompt "red box seven" --speaker ref.wav \\
        --vocoder_checkpoint runs/vocoder/checkpoint-XXX --output out.wav
(checkpoint-XXX: the step of the vocoder checkpoint that pretrain_vocoder.py wrote, e.g. checkpoint-1000.)
    python generate_audio.py --checkpoint runs/RUN/checkpoint-5000 --prompt "..." --speaker ref.wav --seconds 2.5 \\
        --guidance_scale 4 --speaker_guidance_scale 2 --steps 50 --seed 3 --vocoder_checkpoint DIR --output out.wav

The newest checkpoint of --run_dir is used unless --checkpoint names one; its EMA weights unless --no_ema. The text
encoder, speaker encoder and (for a latent DiT) the audio VAE are the ones the run recorded
(checkpoint-STEP/diffusion_meta.json); --vae_checkpoint points at the VAE if it has moved. --speaker is a recording
of the voice to imitate (any rate, mixed to mono), embedded by the run's speaker encoder. The length is --seconds,
or by default the prompt's text tokens times the mel frames per token of the training data. The same --seed gives
the same audio. --save_mel also writes the generated log-mel (torch.save, (n_mels, T)) beside the wav. An empty
--prompt "" with --seconds conditions on the text encoder's encoding of no words (bench/speech_judges.py's floor).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import soundfile
import torch

from model.audio.pipeline import TextToSpeech
from training.checkpoints import checkpoint_from_args
from training.distributed import choose_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", help="a run of pretrain_audio_diffusion.py (its newest checkpoint)")
    parser.add_argument("--checkpoint", help="a checkpoint directory, or its name inside --run_dir")
    parser.add_argument("--prompt", required=True, help="the text to speak (\"\" with --seconds: no words)")
    parser.add_argument("--speaker", help="a reference recording of the voice (needed by speaker-conditioned runs)")
    parser.add_argument("--vocoder_checkpoint", required=True, help="a pretrain_vocoder.py checkpoint directory")
    parser.add_argument("--output", default="generated.wav", help="the wav file to write")
    parser.add_argument("--seconds", type=float, help="length (default: from the prompt's length)")
    parser.add_argument("--guidance_scale", type=float, help="text guidance (default: the config's)")
    parser.add_argument("--speaker_guidance_scale", type=float, help="speaker guidance (default: the config's)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the config's sampling_steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_ema", action="store_true", help="use the trained weights instead of their EMA")
    parser.add_argument("--vae_checkpoint", help="the audio VAE of a latent run (default: the run's)")
    parser.add_argument("--save_mel", action="store_true", help="also write OUTPUT.mel.pt")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    return parser


def read_speaker(path) -> tuple[torch.Tensor, int]:
    """The reference recording mixed to mono: ((S,) float32, sample rate); ValueError when unreadable."""
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, OSError, RuntimeError) as error:
        raise ValueError(f"--speaker {path} could not be read as audio ({' '.join(str(error).split())}): give a "
                         "wav/flac/ogg recording of the voice") from error
    waveform = torch.from_numpy(np.ascontiguousarray(samples)).mean(dim=1)
    if waveform.numel() < rate // 4 or not torch.isfinite(waveform).all():
        raise ValueError(f"--speaker {path} is shorter than 0.25 s or holds non-finite samples: give at least a "
                         "second of clean speech")
    return waveform, rate


def check_arguments(args) -> None:
    if not args.prompt.strip() and args.seconds is None:
        raise ValueError("--prompt is empty: give the text to speak (an empty prompt, speech conditioned on no "
                         "words, also needs --seconds)")
    if args.seconds is not None and args.seconds <= 0:
        raise ValueError(f"--seconds must be positive, got {args.seconds}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    for name in ("guidance_scale", "speaker_guidance_scale"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ValueError(f"--{name} must not be negative, got {getattr(args, name)}")


def generate(args) -> dict:
    """Write args.output; returns {"path", "seconds", "frames"}."""
    check_arguments(args)
    checkpoint = checkpoint_from_args(args, "pretrain_audio_diffusion.py")
    tts = TextToSpeech(checkpoint, args.vocoder_checkpoint, choose_device(args.device), use_ema=not args.no_ema,
                       vae_checkpoint=args.vae_checkpoint)
    speaker = read_speaker(args.speaker) if tts.needs_speaker and args.speaker else None
    speech = tts.speak(args.prompt, speaker, args.seconds, args.steps, args.seed, args.guidance_scale,
                       args.speaker_guidance_scale)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(output), speech.audio, tts.sample_rate)
    if args.save_mel:
        torch.save(speech.mel[0].cpu(), output.with_suffix(".mel.pt"))
    return {"path": output, "seconds": len(speech.audio) / tts.sample_rate, "frames": speech.frames}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = generate(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{result['path']}: {result['seconds']:.2f} s ({result['frames']} mel frames) for {args.prompt!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
