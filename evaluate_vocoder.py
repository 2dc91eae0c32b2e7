"""Measure a trained vocoder by analysis-synthesis over a vocoder cache or a folder of audio files: each clip's
log-mel is vocoded and the result compared with the clip; optionally Griffin-Lim on the same mels beside it.

    python evaluate_vocoder.py --run_dir runs/vocoder_run --data_dir cached_datasets/librispeech_val_vocoder_cached
    python evaluate_vocoder.py --checkpoint runs/vocoder_run/checkpoint-5000 --data_dir CACHE --max_items 200
    python evaluate_vocoder.py --run_dir runs/vocoder_run --input_dir inference/examples --baseline griffin_lim

--input_dir takes every .wav/.flac/.ogg file under a folder (data/audio_folder.py: mono, resampled to the
vocoder's rate, padded to a multiple of the hop); an unreadable or too short file is skipped and counted.
--baseline griffin_lim also resynthesises each clip's mel with Griffin-Lim (model/audio/griffin_lim.py:
torchaudio's InverseMelScale + GriffinLim, --griffin_lim_iters iterations), the training-free baseline, and
prints its figures beside the vocoder's (saved under "baseline" in the JSON).

Metrics per clip, printed as mean ± std and saved as JSON (--output_json, default RUN_DIR/eval_vocoder.json or
CHECKPOINT/eval_vocoder.json), with every clip's values:
  pesq     wideband PESQ (ITU-T P.862.2, `pesq` package), MOS-LQO from -0.5 to 4.64; it is defined at 16 kHz, so
           other rates are resampled to 16 kHz first (the output says so)
  stoi     short-time objective intelligibility (`pystoi`), 0 to 1
  mel_l1   mean |log-mel difference| (the training loss term, same features)
  mrstft   multi-resolution STFT distance: spectral convergence + log-magnitude L1 over the config's resolutions
  rtf      real-time factor: synthesis time / clip duration (after one warm-up call)
A clip a metric cannot take (PESQ finds no speech, STOI has fewer than 30 frames of speech, a clip too short
for the STFTs) is skipped for that metric and counted, with the reason.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torchaudio

from data.audio_folder import folder_clips
from data.sharded_cache import ShardedCache
from data.vocoder_cache import MADE_BY, check_cache_features
from model.audio.criteria import MultiResolutionSTFTLoss
from model.audio.griffin_lim import GriffinLimVocoder
from model.pretrained import load_pretrained
from training.audio_metrics import (PESQ_RATE, MetricSkipped, min_metric_samples, pesq_wideband, reconstruction_metrics,
                                    stoi_score, synthesize)
from training.checkpoints import add_checkpoint_arguments, checkpoint_from_args
from training.distributed import choose_device

METRICS = (("pesq", "PESQ (wideband)"), ("stoi", "STOI"), ("mel_l1", "mel L1"), ("mrstft", "MR-STFT distance"),
           ("rtf", "real-time factor"))
BASELINES = ("griffin_lim",)


def evaluate_clips(vocoder, cache, max_items, device: torch.device) -> tuple[list, dict]:
    """Vocode the first max_items (all when None) clips of the cache (a ShardedCache, or a list of items with
    "mel" and "waveform" as data/audio_folder.py gives); returns (one dict per clip: source_id, seconds and each
    metric's value or None, {skip reason: count})."""
    config = vocoder.config
    stft_loss = MultiResolutionSTFTLoss(config.stft_resolutions)
    count = len(cache) if max_items is None else min(max_items, len(cache))
    clips, skipped = [], {}
    for index in range(count):
        item = cache[index]
        generated, seconds = synthesize(vocoder, item["mel"][None], device, warm_up=index == 0)
        target = item["waveform"][:generated.shape[-1]].float()
        duration = generated.shape[-1] / config.sample_rate
        values, reasons = {"rtf": seconds / duration}, []
        if generated.shape[-1] >= min_metric_samples(config):
            metrics = reconstruction_metrics(generated[None], target[None], config, stft_loss)
            values.update({name: float(value) for name, value in metrics.items()})
        else:
            reasons.append(f"mel_l1 and mrstft: fewer than {min_metric_samples(config)} samples")
        for name, measure in (("pesq", pesq_wideband), ("stoi", stoi_score)):
            try:
                values[name] = measure(target, generated, config.sample_rate)
            except MetricSkipped as reason:
                reasons.append(str(reason))
        for reason in reasons:
            skipped[reason] = skipped.get(reason, 0) + 1
        clips.append({"source_id": item.get("source_id"), "seconds": duration,
                      **{name: values.get(name) for name, _ in METRICS}})
    return clips, skipped


def summarize(clips: list) -> dict:
    """{metric: {"mean", "std" (population; both None without values), "count", "skipped"}} over the clips that
    have the metric."""
    summary = {}
    for name, _ in METRICS:
        values = np.array([clip[name] for clip in clips if clip[name] is not None], dtype=np.float64)
        summary[name] = {"mean": float(values.mean()) if len(values) else None,
                         "std": float(values.std()) if len(values) else None,
                         "count": int(len(values)), "skipped": len(clips) - int(len(values))}
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser, "pretrain_vocoder.py")
    clips = parser.add_mutually_exclusive_group(required=True)
    clips.add_argument("--data_dir", help=f"a vocoder cache written by {MADE_BY}")
    clips.add_argument("--input_dir", help="a folder of .wav/.flac/.ogg files (recursive), e.g. inference/examples")
    parser.add_argument("--max_items", type=int, help="evaluate the first N clips (default: all)")
    parser.add_argument("--baseline", choices=BASELINES, help="also evaluate this training-free baseline on the same "
                                                              "mels and print it beside the vocoder")
    parser.add_argument("--griffin_lim_iters", type=int, default=64, help="Griffin-Lim iterations (--baseline)")
    parser.add_argument("--output_json", help="default: RUN_DIR/eval_vocoder.json (or CHECKPOINT/eval_vocoder.json)")
    return parser


def load_clips(args, vocoder) -> tuple:
    """(the clips to evaluate, the files skipped on reading them: [{"source_id", "reason"}]) from --data_dir
    (checked against the vocoder's features) or --input_dir."""
    if args.input_dir:
        return folder_clips(args.input_dir, vocoder.config.features)
    cache = ShardedCache(args.data_dir, made_by=MADE_BY)
    check_cache_features(cache, vocoder.config)
    return cache, []


def print_table(summaries: dict) -> None:
    """summaries: {column label: summarize()'s output}, printed side by side, one metric a row."""
    header = "".join(f"{label + ' mean ± std':>26}{'clips':>7}{'skipped':>9}" for label in summaries)
    print(f"\n{'metric':<20}{header}")
    for name, label in METRICS:
        cells = []
        for summary in summaries.values():
            row = summary[name]
            spread = f"{row['mean']:>16.4f} ± {row['std']:<7.4f}" if row["count"] else f"{'n/a':>16}{'':10}"
            cells.append(f"{spread}{row['count']:>7}{row['skipped']:>9}")
        print(f"{label:<20}{''.join(cells)}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_items is not None and args.max_items < 1:
            raise ValueError(f"--max_items must be at least 1, got {args.max_items}")
        if args.griffin_lim_iters < 1:
            raise ValueError(f"--griffin_lim_iters must be at least 1, got {args.griffin_lim_iters}")
        device = choose_device(args.device)
        checkpoint = checkpoint_from_args(args, "pretrain_vocoder.py")
        vocoder = load_pretrained(checkpoint, device, family="vocoder")
        cache, files_skipped = load_clips(args, vocoder)
        if len(cache) == 0:
            raise ValueError(f"no clip to evaluate: every file of --input_dir {args.input_dir} was skipped ("
                             + "; ".join(f"{skip['source_id']}: {skip['reason']}" for skip in files_skipped[:3])
                             + ")")
        clips, skipped = evaluate_clips(vocoder, cache, args.max_items, device)
        baseline = None
        if args.baseline == "griffin_lim":
            griffin_lim = GriffinLimVocoder(vocoder.config, args.griffin_lim_iters)
            baseline_clips, baseline_skipped = evaluate_clips(griffin_lim, cache, args.max_items, device)
            baseline = {"name": args.baseline, "n_iter": args.griffin_lim_iters,
                        **summarize(baseline_clips), "skipped": baseline_skipped, "per_clip": baseline_clips}
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    rate = vocoder.config.sample_rate
    summary = summarize(clips)
    source = args.data_dir or args.input_dir
    output = Path(args.output_json or Path(args.run_dir or checkpoint) / "eval_vocoder.json")
    report = {"checkpoint": str(checkpoint), "data_dir": args.data_dir, "input_dir": args.input_dir,
              "clips": len(clips), "files_skipped": files_skipped,
              "audio_seconds": sum(clip["seconds"] for clip in clips), "sample_rate": rate, "device": str(device),
              "pesq_sample_rate": PESQ_RATE, "pesq_resampled_from": rate if rate != PESQ_RATE else None,
              **summary, "skipped": skipped, "per_clip": clips, "baseline": baseline}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))

    print(f"{checkpoint} on {len(clips)} clips of {source} ({report['audio_seconds']:.1f} s of audio, {device})")
    if files_skipped:
        print(f"skipped {len(files_skipped)} file(s) of {source}:")
        for skip in files_skipped:
            print(f"  {skip['source_id']}: {skip['reason']}")
    if rate != PESQ_RATE:
        print(f"note: PESQ is defined at {PESQ_RATE} Hz: the {rate} Hz audio was resampled to {PESQ_RATE} Hz for it")
    print_table({"vocoder": summary, **({"Griffin-Lim": baseline} if baseline else {})})
    for reason, count in sorted(skipped.items()):
        print(f"skipped {count} clip(s): {reason}")
    if baseline:
        print(f"Griffin-Lim: {baseline['n_iter']} iterations on the same log-mels (torchaudio InverseMelScale + "
              "GriffinLim)")
        for reason, count in sorted(baseline["skipped"].items()):
            print(f"Griffin-Lim skipped {count} clip(s): {reason}")
    print(f"\nsaved {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
