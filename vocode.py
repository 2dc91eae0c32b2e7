"""Turn speech (or a saved log-mel spectrogram) into audio with a trained vocoder.

    python vocode.py --run_dir runs/vocoder_run --input speech.wav --output vocoded.wav     # latest checkpoint
    python vocode.py --checkpoint runs/vocoder_run/checkpoint-5000 --input speech.flac --output vocoded.wav
    python vocode.py --run_dir runs/vocoder_run --input mel.pt --output vocoded.wav --subtype FLOAT

An audio file (anything soundfile reads: wav, flac, ogg...) is mixed to mono, resampled to the vocoder's rate,
turned into the log-mel the vocoder was trained on (model/audio/features.py) and resynthesised: the output has
the input's length (at the vocoder's rate). A .pt file holds a log-mel tensor (n_mels, T) or (1, n_mels, T)
(torch.save of features.log_mel's output); it gives (T - 1) * hop_length samples. Prints the duration and the
real-time factor (synthesis time / audio duration, after one warm-up call).
"""

import argparse
import sys
from pathlib import Path

import soundfile
import torch
import torch.nn.functional as F
import torchaudio

from model.audio.features import log_mel
from model.audio.vocoders.config import VocoderConfig
from model.pretrained import load_pretrained
from training.audio_metrics import synthesize
from training.checkpoints import add_checkpoint_arguments, checkpoint_from_args
from training.distributed import choose_device

TRAINED_BY = "pretrain_vocoder.py"
SUBTYPES = ("PCM_16", "FLOAT")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser, TRAINED_BY)
    parser.add_argument("--input", required=True, help="an audio file (wav, flac, ...) or a log-mel tensor (.pt)")
    parser.add_argument("--output", required=True, help="the audio file to write (wav)")
    parser.add_argument("--subtype", default="PCM_16", choices=SUBTYPES, help="16-bit integer or 32-bit float")
    return parser


def read_audio(path: Path, sample_rate: int) -> torch.Tensor:
    """An audio file → mono float32 (S,) at `sample_rate` (channels averaged, resampled with torchaudio)."""
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # (S, channels)
    except soundfile.LibsndfileError as error:
        raise ValueError(f"cannot read {path} as audio ({error}); give a wav/flac/ogg file or a mel .pt") from error
    waveform = torch.from_numpy(data).mean(dim=1)
    if rate != sample_rate:
        waveform = torchaudio.functional.resample(waveform, rate, sample_rate)
    return waveform


def load_mel(path: Path, config: VocoderConfig) -> torch.Tensor:
    """A saved log-mel (n_mels, T) or (1, n_mels, T) → float32 (1, n_mels, T), checked against the config."""
    try:
        mel = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many kinds for a file that is not a saved tensor
        raise ValueError(f"cannot load {path} as a tensor ({error}): save the mel with torch.save(mel, path)") \
            from error
    if not isinstance(mel, torch.Tensor) or mel.is_complex() or not mel.is_floating_point():
        raise ValueError(f"{path} must hold a float tensor (n_mels, T), got {type(mel).__name__}"
                         + (f" of {mel.dtype}" if isinstance(mel, torch.Tensor) else ""))
    if mel.dim() == 2:
        mel = mel[None]
    if mel.dim() != 3 or mel.shape[0] != 1 or mel.shape[1] != config.n_mels or mel.shape[2] < 2:
        raise ValueError(f"{path} holds a tensor of shape {tuple(mel.shape)}; this vocoder takes a log-mel "
                         f"(n_mels={config.n_mels}, T >= 2) or (1, {config.n_mels}, T) from features.log_mel at "
                         f"{config.sample_rate} Hz, hop {config.hop_length}")
    if not torch.isfinite(mel).all():
        raise ValueError(f"{path} holds NaN or infinite values: a log-mel from features.log_mel is finite")
    return mel.float()


def mel_of_audio(waveform: torch.Tensor, config: VocoderConfig) -> torch.Tensor:
    """waveform (S,) → log-mel (1, n_mels, 1 + ceil(S / hop)) of the waveform zero-padded to a multiple of the hop,
    so that the vocoder's (T - 1) * hop samples cover all S."""
    hop = config.hop_length
    if waveform.shape[-1] <= config.n_fft // 2:
        milliseconds = 1000 * (config.n_fft // 2) / config.sample_rate
        raise ValueError(f"the input has {waveform.shape[-1]} samples at {config.sample_rate} Hz; the mel needs more "
                         f"than n_fft / 2 = {config.n_fft // 2} ({milliseconds:.0f} ms)")
    padded = F.pad(waveform, (0, -waveform.shape[-1] % hop))
    return log_mel(padded[None], config.features)


def write_audio(path: Path, waveform: torch.Tensor, sample_rate: int, subtype: str) -> None:
    """waveform (S,) → a wav file; clipped to [-1, 1] (integer samples would wrap around otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), waveform.clamp(-1, 1).numpy(), sample_rate, subtype=subtype)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = choose_device(args.device)
        checkpoint = checkpoint_from_args(args, TRAINED_BY)
        vocoder = load_pretrained(checkpoint, device, family="vocoder")
        config = vocoder.config
        source = Path(args.input)
        if not source.is_file():
            raise FileNotFoundError(f"--input {source} not found")
        if source.suffix == ".pt":
            mel, length = load_mel(source, config), None
        else:
            waveform = read_audio(source, config.sample_rate)
            mel, length = mel_of_audio(waveform, config), waveform.shape[-1]
        generated, seconds = synthesize(vocoder, mel, device)
        generated = generated[:length]
        write_audio(Path(args.output), generated, config.sample_rate, args.subtype)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    duration = generated.shape[-1] / config.sample_rate
    print(f"wrote {args.output}: {duration:.2f} s at {config.sample_rate} Hz ({args.subtype}) from {checkpoint}")
    print(f"synthesis {seconds * 1000:.1f} ms on {device}: real-time factor {seconds / duration:.4f} "
          f"({duration / max(seconds, 1e-9):,.0f}x faster than real time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
