"""Cut speech into segments with their log-mel spectrograms: the sharded cache that pretrain_vocoder.py reads.

    python preprocess_vocoder_dataset.py --output_dir cached_datasets/librispeech_train_vocoder_cached \\
        --split train.360                                   # LibriSpeech from the Hugging Face hub (streamed)
    python preprocess_vocoder_dataset.py --dataset_name builtin:speech --split train \\
        --output_dir cached_datasets/speech_train           # offline: speech synthesised with espeak-ng
    python preprocess_vocoder_dataset.py --dataset_name builtin:speech --voices all --split train \
        --output_dir cached_datasets/speech_all_train       # espeak-ng's 12 voices and flite's 4
    python preprocess_vocoder_dataset.py --dataset_name builtin:speech --split validation \\
        --output_dir cached_datasets/speech_val
    python preprocess_vocoder_dataset.py --input_dir my_wavs --split train --output_dir cached_datasets/my_train

Sources and splits are described in data/audio_sources.py. Every item of the cache (data/sharded_cache.py) is

    {"waveform": float32 (S,) at --sample_rate, "mel": float32 (n_mels, 1 + S // hop_length) = log_mel(waveform),
     "speaker": str, "text": str (the transcript of the whole source file), "source_id": "KEY#K"}

where piece K of a file starts at K * --segment_seconds (silent pieces are dropped, so K may skip numbers).
meta.json records the audio feature parameters (model/audio/features.py), the source, the segmenting,
the counts and every skipped file with its reason. Output order does not depend on --num_workers.
"""

import argparse
import dataclasses
import functools
import os
import sys

import torch
from tqdm import tqdm

from data.audio_sources import (AudioRecord, AudioSource, Segmenting, add_audio_feature_arguments,
                                add_audio_source_arguments, audio_features_from_args, audio_source_from_args,
                                load_segments)
from data.builtin_speech import BUILTIN_SPEECH_NAME, VOICE_GROUPS, parse_voices
from data.cli import run_preprocessing
from data.sharded_cache import ShardedCacheWriter, map_in_workers
from model.audio.features import AudioFeatureConfig, log_mel

MAX_LISTED_SKIPS = 20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_audio_source_arguments(
        parser, builtins=f"{BUILTIN_SPEECH_NAME} (needs espeak-ng or flite)", transcripts_optional=True,
        num_items_help=f"read at most N files/rows; {BUILTIN_SPEECH_NAME}: how many utterances to synthesise "
                       "(default 1000 train, 100 validation)",
        val_fraction_default=0.05, val_fraction_help="built-in, folder and single saved-dataset sources: share of "
                                                     "items (by a hash of their key) in validation; use the same "
                                                     "value for both splits")
    parser.add_argument("--voices", help=f"{BUILTIN_SPEECH_NAME}: comma-separated voices (the speakers) or groups "
                                         f"{', '.join(VOICE_GROUPS)}; default espeak (its 12 voices). Voices: "
                                         f"{', '.join(VOICE_GROUPS['all'])}")
    add_audio_feature_arguments(parser, "audio features (model/audio/features.py)")
    segments = parser.add_argument_group("segments")
    segments.add_argument("--segment_seconds", type=float, default=4.0, help="cut files into pieces this long")
    segments.add_argument("--min_segment_seconds", type=float, default=1.0,
                          help="keep a last piece (or a whole file) only if at least this long")
    segments.add_argument("--silence_db", type=float, default=-50.0,
                          help="drop pieces whose RMS level is below this many dBFS")
    parser.add_argument("--output_dir", help="default cached_datasets/vocoder_SPLIT")
    parser.add_argument("--items_per_shard", type=int, default=256)
    parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="processes that decode, resample and compute mels (0 or 1: this process; "
                             "default min(4, CPUs))")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cache at --output_dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_preprocessing(argv, build_parser(), write, print_summary)


def write(args) -> dict:
    """Write the vocoder cache the flags describe to args.output_dir (set to its default when empty); returns meta."""
    args.output_dir = output_dir = args.output_dir or f"cached_datasets/vocoder_{args.split}"
    source = audio_source_from_args(args, voices=None if args.voices is None else parse_voices(args.voices))
    features = audio_features_from_args(args)
    segmenting = Segmenting(features.sample_rate, args.segment_seconds, args.min_segment_seconds,
                            args.silence_db)
    if segmenting.min_segment_samples <= features.n_fft // 2:
        raise ValueError(f"--min_segment_seconds {args.min_segment_seconds} gives {segmenting.min_segment_samples} "
                         f"samples, too few for n_fft {features.n_fft}; raise it")
    if source.streaming_note:
        print(source.streaming_note, file=sys.stderr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small tensors: threads cost more than they give; --num_workers scales
    try:
        return write_vocoder_cache(source, features, segmenting, output_dir, num_workers=args.num_workers,
                                   items_per_shard=args.items_per_shard, overwrite=args.overwrite)
    finally:
        torch.set_num_threads(threads)


def vocoder_items(record: AudioRecord, segmenting: Segmenting, features: AudioFeatureConfig) -> tuple[list, dict]:
    """The cache items of one record (see the module docstring) and its report: {"source_id", "skipped"
    (reason or None), "silent_segments"}. Runs in a worker process."""
    loaded = load_segments(record, segmenting)
    items = [{"waveform": segment, "mel": log_mel(segment, features), "speaker": record.speaker,
              "text": record.text, "source_id": f"{record.source_id}#{index}"}
             for index, segment in loaded.segments.items()]
    return items, {"source_id": record.source_id, "skipped": loaded.skipped, "silent_segments": loaded.silent_segments}


def write_vocoder_cache(source: AudioSource, features: AudioFeatureConfig, segmenting: Segmenting, output_dir: str, *,
                        items_per_shard: int = 256, num_workers: int = 0, overwrite: bool = False) -> dict:
    """Read `source`, write its vocoder items to a sharded cache at `output_dir`, return the cache's meta.
    ValueError when every record was skipped (nothing to train on)."""
    work = functools.partial(vocoder_items, segmenting=segmenting, features=features)
    skipped, speakers = [], set()
    records = samples = silent = 0
    with ShardedCacheWriter(output_dir, items_per_shard=items_per_shard, overwrite=overwrite) as writer:
        results = map_in_workers(work, source.records(), num_workers)
        for items, report in tqdm(results, total=source.expected_items, desc="preprocessing", unit=" files"):
            records += 1
            silent += report["silent_segments"]
            if report["skipped"]:
                skipped.append({"source_id": report["source_id"], "reason": report["skipped"]})
            for item in items:
                writer.add(item)
                samples += item["waveform"].numel()
                speakers.add(item["speaker"])
        if writer.num_items == 0:
            reasons = "; ".join(f"{skip['source_id']}: {skip['reason']}" for skip in skipped[:3])
            raise ValueError(f"no audio left to cache: {records} file(s) read, all skipped ({reasons or 'none'})")
        return writer.finish({
            "made_by": "preprocess_vocoder_dataset.py", "kind": "vocoder", "features": features.to_dict(),
            "source": source.describe(), "segmenting": dataclasses.asdict(segmenting),
            "seconds": samples / features.sample_rate,
            "records_read": records, "records_skipped": len(skipped), "silent_segments_dropped": silent,
            "speakers": sorted(speakers), "skipped": skipped})


def print_summary(meta: dict, args, total_seconds: float) -> None:
    source, output_dir = meta["source"], args.output_dir
    where = source.get("dataset_name") or source.get("input_dir") or source.get("from_disk")
    print(f"\nVocoder cache written to {output_dir}")
    print(f"  source    {where}, split {source['split']}")
    print(f"  items     {meta['num_items']:,} segments in {len(meta['shards'])} shard(s), "
          f"{meta['seconds']:,.1f} s of audio ({meta['seconds'] / 3600:.2f} h), {len(meta['speakers'])} speaker(s)")
    print(f"  features  {meta['features']['n_mels']} mels at {meta['features']['sample_rate']} Hz, "
          f"hop {meta['features']['hop_length']}")
    print(f"  files     {meta['records_read']:,} read, {meta['records_skipped']:,} skipped, "
          f"{meta['silent_segments_dropped']:,} silent segment(s) dropped")
    for skip in meta["skipped"][:MAX_LISTED_SKIPS]:
        print(f"    skipped {skip['source_id']}: {skip['reason']}")
    if len(meta["skipped"]) > MAX_LISTED_SKIPS:
        print(f"    ... and {len(meta['skipped']) - MAX_LISTED_SKIPS} more (listed in meta.json)")
    print(f"  time      {total_seconds:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
