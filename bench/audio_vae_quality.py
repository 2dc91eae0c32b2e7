"""How much an audio VAE (pretrain_audio_vae.py) loses, heard through a vocoder: each utterance of a cache written
by preprocess_audio_diffusion_dataset.py is reconstructed (posterior mean, with its speaker embedding), and

  mel_l1  mean |log-mel of the reconstruction - the real log-mel| over the whole utterance
  pesq    wideband PESQ of vocoder(reconstruction) against vocoder(real mel): what the VAE costs on top of the
          vocoder (4.64 = no audible loss)
  stoi    STOI of the same pair (0 to 1)

    python bench/audio_vae_quality.py --vae_checkpoint runs/phrases_vae/checkpoint-2000 \\
        --vocoder_checkpoint runs/phrases_vocoder/checkpoint-3000 --cache_dir cached_datasets/phrases_val

--pad_to FRAMES pads each utterance with silence (the VAE's pad_value) to FRAMES mel frames before it is
reconstructed, as the world model's clips are (preprocess_multimodal_dataset.py --audio_frames), and scores the
utterance's own frames: a VAE that attends over the whole input may treat a long padded clip worse.

Prints mean ± std of each metric (PESQ and STOI skip a clip they cannot score, counted) and writes --output_json
(default VAE_CHECKPOINT/audio_vae_quality.json) with every clip's figures.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import measure_and_report  # noqa: E402
from data.sharded_cache import ShardedCache  # noqa: E402
from model.audio.pipeline import load_audio_vae_checkpoint  # noqa: E402
from model.pretrained import load_pretrained  # noqa: E402
from training.audio_metrics import MetricSkipped, pesq_wideband, stoi_score, synthesize  # noqa: E402
from training.distributed import choose_device  # noqa: E402

FEATURE_KEYS = ("sample_rate", "n_mels", "n_fft", "hop_length", "win_length", "f_min", "f_max")
METRICS = ("mel_l1", "pesq", "stoi")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae_checkpoint", required=True, help="a pretrain_audio_vae.py checkpoint directory")
    parser.add_argument("--vocoder_checkpoint", required=True, help="a pretrain_vocoder.py checkpoint directory")
    parser.add_argument("--cache_dir", required=True, help="a preprocess_audio_diffusion_dataset.py cache")
    parser.add_argument("--max_items", type=int, default=64, help="the first N utterances of the cache")
    parser.add_argument("--pad_to", type=int, help="pad each utterance with silence to this many mel frames first")
    parser.add_argument("--output_json", help="default VAE_CHECKPOINT/audio_vae_quality.json")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    return parser


@torch.no_grad()
def measure(args) -> dict:
    if args.max_items < 1:
        raise ValueError(f"--max_items must be at least 1, got {args.max_items}")
    device = choose_device(args.device)
    cache = ShardedCache(args.cache_dir)
    vae = load_audio_vae_checkpoint(args.vae_checkpoint, device)
    vocoder = load_pretrained(args.vocoder_checkpoint, device, family="vocoder")
    features = cache.meta["features"]
    differ = [key for key in FEATURE_KEYS if vocoder.features.to_dict()[key] != features[key]]
    if differ:
        raise ValueError(f"the vocoder {args.vocoder_checkpoint} takes other mel features than the cache "
                         f"{args.cache_dir} ({', '.join(differ)} differ): pass a vocoder trained on these features")
    clips, skipped = [], {}
    for index in range(min(args.max_items, len(cache))):
        item = cache[index]
        mel = item["mel"].float().to(device)  # (n_mels, T)
        speaker = item["speaker_embedding"].float().to(device)[None] if vae.config.speaker_embedding_dim else None
        frames = mel.shape[-1]
        if args.pad_to is not None and args.pad_to < frames:
            raise ValueError(f"--pad_to {args.pad_to} is shorter than utterance {index} of {args.cache_dir} "
                             f"({frames} frames): pass at least the longest utterance's length")
        padded = torch.nn.functional.pad(mel, (0, (args.pad_to or frames) - frames), value=vae.config.pad_value)
        reconstruction = vae(padded[None, None], speaker, sample_posterior=False)[0][0, 0, :, :frames]
        real_audio, _ = synthesize(vocoder, mel[None], device, warm_up=index == 0)
        vae_audio, _ = synthesize(vocoder, reconstruction[None], device, warm_up=False)
        values = {"source_id": item.get("source_id"), "mel_l1": float((reconstruction - mel).abs().mean())}
        for name, metric in (("pesq", pesq_wideband), ("stoi", stoi_score)):
            try:
                values[name] = metric(real_audio, vae_audio, features["sample_rate"])
            except MetricSkipped as reason:
                values[name] = None
                skipped[str(reason)] = skipped.get(str(reason), 0) + 1
        clips.append(values)
    summary = {}
    for name in METRICS:
        found = np.array([clip[name] for clip in clips if clip[name] is not None], dtype=np.float64)
        summary[name] = {"mean": float(found.mean()) if len(found) else None,
                         "std": float(found.std()) if len(found) else None, "count": int(len(found))}
    return {"vae_checkpoint": str(args.vae_checkpoint), "vocoder_checkpoint": str(args.vocoder_checkpoint),
            "cache_dir": str(args.cache_dir), "pad_to": args.pad_to, "summary": summary, "skipped": skipped, "clips": clips}


def print_report(report: dict, path: Path) -> None:
    labels = {"mel_l1": "mel L1 (VAE vs real mel)", "pesq": "PESQ (vocoded VAE vs vocoded real mel)",
              "stoi": "STOI (same pair)"}
    for name in METRICS:
        figures = report["summary"][name]
        shown = "n/a" if figures["mean"] is None else f"{figures['mean']:.3f} ± {figures['std']:.3f}"
        print(f"{labels[name]:40} {shown:>16}  ({figures['count']} clips)")
    for reason, count in report["skipped"].items():
        print(f"skipped: {reason} ({count} clips)")
    print(f"\nwritten: {path}")


def main(argv=None) -> int:
    return measure_and_report(
        build_parser(), measure,
        lambda args, report: Path(args.output_json or Path(args.vae_checkpoint) / "audio_vae_quality.json"),
        print_report, argv)


if __name__ == "__main__":
    sys.exit(main())
