"""Cut speech into utterances with log-mels, transcripts, text embeddings and speaker embeddings: the cache that
pretrain_audio_vae.py and pretrain_audio_diffusion.py read (one split per run).

    python preprocess_audio_diffusion_dataset.py --output_dir cached_datasets/librispeech_train_diffusion_cached \\
        --split train.360 --max_conditions 512               # LibriSpeech, T5 and ECAPA from the hub
    python preprocess_audio_diffusion_dataset.py --dataset_name builtin:phrases --split train \\
        --text_encoder builtin:words --speaker_encoder resemblyzer \\
        --output_dir cached_datasets/phrases_train_diffusion_cached          # offline: no download at all
    python preprocess_audio_diffusion_dataset.py --dataset_name builtin:phrases --split validation \\
        --text_encoder builtin:words --speaker_encoder resemblyzer \\
        --output_dir cached_datasets/phrases_val_diffusion_cached

Sources: a hub dataset (default openslr/librispeech_asr, `clean`), --from_disk, --input_dir, builtin:speech (see
data/audio_sources.py) and builtin:phrases (data/builtin_phrases.py: a 26-word corpus whose validation prompts
never occur in train). Each source item is one utterance (not cut into segments): decoded, mixed to mono,
resampled to --sample_rate, and kept if it lasts between --min_seconds and --max_seconds and is not silent.

Each cache item (data/sharded_cache.py) holds

    {"mel": (n_mels, T) log-mel (model/audio/features.py, the vocoder's features), "frames": T, "text": transcript,
     "text_emb": (L, D) the text encoder's embeddings of the real tokens (L <= --max_conditions),
     "text_truncated": bool, "speaker": str, "speaker_embedding": (S,), "source_id": str}

Text: --text_encoder is a T5 hub name or local directory, or builtin:words (no download); transcripts longer
than --max_conditions tokens are truncated and counted. Speaker: --speaker_encoder is SpeechBrain's ECAPA-TDNN
by hub name (default speechbrain/spkrec-ecapa-voxceleb, 192-dim) or local directory, or resemblyzer (256-dim,
weights inside its pip wheel). A hub name that cannot be reached stops at once with the flags that work offline.
Corrupt or unreadable audio, empty transcripts, and utterances too short, too long or silent are skipped and
counted (meta.json lists them with the reason). meta.json also records the features, the source, both encoders'
descriptions, speaker_embedding_dim, mel_mean and mel_std (over every frame), max_frames and mean_text_tokens.
"""

import argparse
import functools
import itertools
import math
import os
import sys

import torch
import torchaudio
from tqdm import tqdm

from data.audio_sources import (AudioDecodeError, AudioRecord, add_audio_feature_arguments, add_audio_source_arguments,
                                audio_features_from_args, audio_source_from_args, decode_record, rms_db)
from data.builtin_phrases import BUILTIN_PHRASES_NAME, DEFAULT_VAL_FRACTION, phrase_records
from data.builtin_speech import BUILTIN_SPEECH_NAME
from data.cli import run_preprocessing
from data.saved_datasets import DataSourceError
from data.sharded_cache import ShardedCacheWriter, check_output_dir, map_in_workers
from model.audio.features import AudioFeatureConfig, log_mel
from model.audio.speaker_encoders import DEFAULT_SPEAKER_ENCODER, RESEMBLYZER, load_speaker_encoder
from model.text_encoders import BUILTIN_WORDS, DEFAULT_TEXT_ENCODER, WORD_PATTERN, load_text_encoder
from training.distributed import choose_device

STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
MAX_LISTED_SKIPS = 100


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_audio_source_arguments(
        parser, builtins=f"{BUILTIN_PHRASES_NAME} or {BUILTIN_SPEECH_NAME}", transcripts_optional=False,
        num_items_help="read at most N utterances (built-in sources: how many to synthesise; default 2000/200 "
                       "phrases, 1000/100 speech)",
        val_fraction_help=f"built-in and folder sources: share held out for validation (default "
                          f"{DEFAULT_VAL_FRACTION} of the phrases' prompts, 0.05 otherwise)")
    add_audio_feature_arguments(parser, "audio features (model/audio/features.py; use the vocoder's)")
    utterances = parser.add_argument_group("utterances")
    utterances.add_argument("--min_seconds", type=float, default=0.5)
    utterances.add_argument("--max_seconds", type=float, default=20.0, help="longer utterances are skipped")
    utterances.add_argument("--silence_db", type=float, default=-50.0, help="skip utterances below this RMS level")
    encoders = parser.add_argument_group("encoders")
    encoders.add_argument("--text_encoder", default=DEFAULT_TEXT_ENCODER,
                          help=f"T5 hub name or local directory, or {BUILTIN_WORDS} (offline)")
    encoders.add_argument("--max_conditions", type=int, default=512,
                          help="text tokens per transcript at most (longer ones are truncated and counted)")
    encoders.add_argument("--speaker_encoder", default=DEFAULT_SPEAKER_ENCODER,
                          help=f"ECAPA hub name or local directory, or {RESEMBLYZER} (offline, 256-dim)")
    encoders.add_argument("--batch_size", type=int, default=16, help="utterances encoded at once")
    encoders.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", help="default cached_datasets/audio_<split>_diffusion_cached")
    output.add_argument("--storage_dtype", choices=sorted(STORAGE_DTYPES), default="float32",
                        help="dtype of the stored mels and embeddings")
    output.add_argument("--items_per_shard", type=int, default=512)
    output.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="processes that decode and compute mels (0 or 1: this process)")
    output.add_argument("--overwrite", action="store_true", help="replace an existing cache at --output_dir")
    return parser


def records_from_args(args) -> tuple:
    """(iterator of AudioRecords, expected count or None, source description)."""
    if args.dataset_name == BUILTIN_PHRASES_NAME:
        fraction = args.val_fraction or DEFAULT_VAL_FRACTION
        records = list(phrase_records(args.split, args.num_items, fraction, args.seed))
        return iter(records), len(records), {"kind": "builtin", "dataset_name": BUILTIN_PHRASES_NAME,
                                             "split": "validation" if args.split == "val" else args.split,
                                             "num_items": len(records), "val_fraction": fraction, "seed": args.seed}
    source = audio_source_from_args(args, val_fraction=args.val_fraction or 0.05)
    if source.streaming_note:
        print(source.streaming_note, file=sys.stderr)
    try:
        records = source.records()
    except DataSourceError as error:
        raise DataSourceError(f"{error} (or --dataset_name {BUILTIN_PHRASES_NAME}, the small-vocabulary corpus)") \
            from error
    return records, source.expected_items, source.describe()


def load_utterance(record: AudioRecord, features: AudioFeatureConfig, min_seconds: float, max_seconds: float,
                   silence_db: float) -> tuple[dict | None, str | None, str]:
    """One record -> ({"waveform": (S,) at the features' rate, "mel": (n_mels, T), ...}, None, source_id) or
    (None, why it is skipped, source_id). Runs in a worker process; never raises for bad input."""
    if not record.text.strip():
        return None, "empty transcript", record.source_id
    try:
        waveform, sample_rate = decode_record(record)
    except AudioDecodeError as error:
        return None, str(error), record.source_id
    if sample_rate != features.sample_rate:
        waveform = torchaudio.functional.resample(waveform, sample_rate, features.sample_rate)
    seconds = waveform.numel() / features.sample_rate
    if not min_seconds <= seconds <= max_seconds or waveform.numel() <= features.n_fft // 2:
        return None, f"{seconds:.2f} s, outside --min_seconds {min_seconds} .. --max_seconds {max_seconds}", \
            record.source_id
    if rms_db(waveform) < silence_db:
        return None, f"silent ({rms_db(waveform):.1f} dBFS < --silence_db {silence_db})", record.source_id
    return {"waveform": waveform, "mel": log_mel(waveform, features), "text": " ".join(record.text.split()),
            "speaker": record.speaker, "source_id": record.source_id}, None, record.source_id


def untruncated_tokens(text_encoder, text: str) -> int:
    """How many tokens `text` has before the encoder's truncation (its end token included)."""
    if hasattr(text_encoder, "tokenizer"):
        return len(text_encoder.tokenizer(text)["input_ids"])
    return len(WORD_PATTERN.findall(text.lower())) + 1


@torch.no_grad()
def encode_batch(loaded: list[dict], text_encoder, speaker_encoder, sample_rate: int,
                 dtype: torch.dtype) -> list[dict]:
    """Utterances of load_utterance -> cache items (see the module docstring)."""
    text_emb, text_mask = text_encoder.encode([item["text"] for item in loaded])
    speakers = speaker_encoder.embed([item["waveform"] for item in loaded], sample_rate)
    items = []
    for row, item in enumerate(loaded):
        items.append({"mel": item["mel"].to(dtype), "frames": item["mel"].shape[-1], "text": item["text"],
                      "text_emb": text_emb[row][text_mask[row]].to(dtype).cpu(),
                      "text_truncated": untruncated_tokens(text_encoder, item["text"]) > text_encoder.max_length,
                      "speaker": item["speaker"], "speaker_embedding": speakers[row].to(dtype).cpu(),
                      "source_id": item["source_id"]})
    return items


def check_args(args) -> None:
    for name in ("batch_size", "items_per_shard", "max_conditions"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.min_seconds <= args.max_seconds:
        raise ValueError(f"need 0 < --min_seconds <= --max_seconds, got {args.min_seconds} and {args.max_seconds}")


def write_audio_diffusion_cache(args) -> dict:
    """Read the source, write the cache to args.output_dir (set), return meta.json's contents."""
    check_args(args)
    check_output_dir(args.output_dir, args.overwrite)
    features = audio_features_from_args(args)
    device = choose_device(args.device)
    speaker_encoder = load_speaker_encoder(args.speaker_encoder, device)  # before any work: fails fast offline
    text_encoder = load_text_encoder(args.text_encoder, device, args.max_conditions)
    records, expected, source = records_from_args(args)
    load = functools.partial(load_utterance, features=features, min_seconds=args.min_seconds,
                             max_seconds=args.max_seconds, silence_db=args.silence_db)
    reports = map_in_workers(load, records, args.num_workers)
    dtype = STORAGE_DTYPES[args.storage_dtype]
    skipped, speakers, truncated, text_tokens, frames = [], set(), 0, 0, []
    mel_sum = mel_square = 0.0
    writer = ShardedCacheWriter(args.output_dir, items_per_shard=args.items_per_shard, overwrite=args.overwrite)
    with writer, tqdm(total=expected, desc="encoding", unit=" utt") as progress:
        while chunk := list(itertools.islice(reports, args.batch_size)):
            progress.update(len(chunk))
            skipped += [{"source_id": item_id, "reason": reason} for item, reason, item_id in chunk if item is None]
            good = [item for item, _, _ in chunk if item is not None]
            for entry in encode_batch(good, text_encoder, speaker_encoder, features.sample_rate, dtype) if good else []:
                writer.add(entry)
                speakers.add(entry["speaker"])
                truncated += entry["text_truncated"]
                text_tokens += entry["text_emb"].shape[0]
                frames.append(entry["frames"])
                mel = entry["mel"].double()
                mel_sum, mel_square = mel_sum + float(mel.sum()), mel_square + float(mel.square().sum())
        if not writer.num_items:
            reasons = "; ".join(f"{skip['source_id']}: {skip['reason']}" for skip in skipped[:3])
            raise ValueError(f"no utterance left to cache: {len(skipped)} read, all skipped ({reasons or 'none'})")
        count = sum(frames) * features.n_mels
        mel_mean = mel_sum / count
        return writer.finish({
            "made_by": "preprocess_audio_diffusion_dataset.py", "kind": "audio_diffusion",
            "split": source["split"], "source": source, "features": features.to_dict(),
            "text_encoder": text_encoder.describe(), "speaker_encoder": speaker_encoder.describe(),
            "speaker_embedding_dim": speaker_encoder.dim, "max_conditions": args.max_conditions,
            "storage_dtype": args.storage_dtype, "mel_mean": mel_mean,
            "mel_std": math.sqrt(max(mel_square / count - mel_mean ** 2, 0.0)), "max_frames": max(frames),
            "seconds": sum(frames) * features.hop_length / features.sample_rate,
            "mean_text_tokens": text_tokens / writer.num_items, "speakers": sorted(speakers),
            "counts": {"utterances": writer.num_items, "skipped": len(skipped), "truncated_texts": truncated},
            "skipped": skipped[:MAX_LISTED_SKIPS]})


def main(argv: list[str] | None = None) -> int:
    return run_preprocessing(argv, build_parser(), write, print_summary)


def write(args) -> dict:
    """Write the cache the flags describe to args.output_dir (set to its default when empty); returns meta."""
    split = "validation" if args.split == "val" else args.split
    args.output_dir = args.output_dir or f"cached_datasets/audio_{split}_diffusion_cached"
    threads = torch.get_num_threads()
    try:
        return write_audio_diffusion_cache(args)
    finally:
        torch.set_num_threads(threads)


def print_summary(meta: dict, args, seconds: float) -> None:
    output_dir = args.output_dir
    counts, source = meta["counts"], meta["source"]
    where = source.get("dataset_name") or source.get("input_dir") or source.get("from_disk")
    print(f"\nAudio diffusion cache written to {output_dir}")
    print(f"  source    {where}, split {meta['split']}")
    print(f"  items     {counts['utterances']:,} utterances, {meta['seconds']:,.1f} s of audio, "
          f"{len(meta['speakers'])} speaker(s), longest {meta['max_frames']} frames")
    print(f"  skipped   {counts['skipped']:,}")
    for skip in meta["skipped"][:10]:
        print(f"    {skip['source_id']}: {skip['reason']}")
    print(f"  text      {meta['text_encoder']['name']} (dim {meta['text_encoder']['dim']}), "
          f"{meta['mean_text_tokens']:.1f} tokens on average, {counts['truncated_texts']:,} truncated to "
          f"--max_conditions {meta['max_conditions']}")
    print(f"  speaker   {meta['speaker_encoder']['name']} (dim {meta['speaker_embedding_dim']})")
    print(f"  mels      {meta['features']['n_mels']} at {meta['features']['sample_rate']} Hz, hop "
          f"{meta['features']['hop_length']}; mean {meta['mel_mean']:.3f}, std {meta['mel_std']:.3f}")
    print(f"  time      {seconds:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
