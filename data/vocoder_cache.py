"""The vocoder cache of preprocess_vocoder_dataset.py as training and evaluation read it: checked against a
vocoder's audio features, and cut into random aligned mel/waveform crops.

    train_cache, val_cache = open_vocoder_caches(train_dir, val_dir, config)
    train = SegmentBatches(train_cache, batch_size=16, frames=32, features=config.features, seed=0, rank=0,
                           world_size=1)
    batch = train.batch(i)          # {"mel": (B, n_mels, 32), "waveform": (B, 31 * hop)}, a pure function of i

A crop of T mel frames starting at frame f pairs mel[:, f:f + T] with waveform[f * hop : (f + T - 1) * hop], the
(T - 1) * hop samples the vocoder generates from those frames (frame t is centred on sample t * hop).
"""

import random

import torch
import torch.nn.functional as F

from data.cached_batches import CachedBatches
from data.sharded_cache import ShardedCache
from model.audio.features import AudioFeatureConfig, log_mel, num_samples
from model.audio.vocoders.config import VocoderConfig

MADE_BY = "preprocess_vocoder_dataset.py"
TRAIN_OPEN_SHARDS = 8  # shards kept loaded while training, and so mixed together by CachedBatches


def check_cache_features(cache: ShardedCache, config: VocoderConfig) -> None:
    """ValueError unless `cache` is a vocoder cache whose mels were made with exactly config.features."""
    if cache.meta.get("kind") != "vocoder" or "features" not in cache.meta:
        raise ValueError(f"{cache.directory} is not a vocoder cache (its meta.json has no vocoder features): write it "
                         f"with {MADE_BY}")
    cached = AudioFeatureConfig.from_dict(cache.meta["features"]).to_dict()
    wanted = config.features.to_dict()
    differing = [key for key in wanted if cached[key] != wanted[key]]
    if differing:
        found = ", ".join(f"{key}={cached[key]}" for key in differing)
        expected = ", ".join(f"{key}={wanted[key]}" for key in differing)
        raise ValueError(f"{cache.directory} holds mels with {found}, but config '{config.name}' expects {expected}: "
                         f"re-write the cache with {MADE_BY} (--sample_rate, --n_mels, --n_fft, --hop_length, ...) "
                         f"or override the config with --set KEY=VALUE")


def open_vocoder_caches(train_dir, val_dir, config: VocoderConfig) -> tuple[ShardedCache, ShardedCache]:
    """The train and validation caches, both checked against the config's audio features."""
    train = ShardedCache(train_dir, made_by=f"{MADE_BY} --split train", open_shards=TRAIN_OPEN_SHARDS)
    val = ShardedCache(val_dir, made_by=f"{MADE_BY} --split validation")
    for cache in (train, val):
        check_cache_features(cache, config)
    return train, val


def crop_segment(item: dict, first_frame: int, frames: int, features: AudioFeatureConfig) -> tuple:
    """item: a cache item ("mel" (n_mels, N), "waveform" (S,)) → mel (n_mels, frames), waveform
    ((frames - 1) * hop,): frames [first_frame, first_frame + frames) and the samples they generate. A clip of
    fewer than `frames` frames is zero-padded at the end (first_frame must be 0) and its mel recomputed."""
    length = num_samples(frames, features)
    mel, waveform = item["mel"], item["waveform"]
    if mel.shape[-1] < frames:
        waveform = F.pad(waveform, (0, length - waveform.shape[-1]))  # N < frames, so S < N * hop <= length
        return log_mel(waveform, features), waveform
    if not 0 <= first_frame <= mel.shape[-1] - frames:
        raise ValueError(f"crop of {frames} frames from frame {first_frame} does not fit a clip of {mel.shape[-1]}")
    start = first_frame * features.hop_length
    return mel[:, first_frame:first_frame + frames], waveform[start:start + length]


class SegmentBatches:
    """This rank's micro-batches of random crops: batch(i) → {"mel": (B, n_mels, frames), "waveform":
    (B, (frames - 1) * hop)}, float32. The items come from CachedBatches and each crop's first frame from
    random.Random(f"{seed}:{rank}:{i}"), so a batch is a pure function of i (exact resume)."""

    def __init__(self, cache: ShardedCache, batch_size: int, frames: int, features: AudioFeatureConfig, seed: int,
                 rank: int, world_size: int):
        self.items = CachedBatches(cache, batch_size, seed, rank, world_size, collate=list)
        self.frames, self.features, self.seed, self.rank = frames, features, seed, rank

    def batch(self, i: int) -> dict:
        generator = random.Random(f"{self.seed}:{self.rank}:{i}")
        mels, waveforms = [], []
        for item in self.items.batch(i):
            first_frame = generator.randint(0, max(0, item["mel"].shape[-1] - self.frames))
            mel, waveform = crop_segment(item, first_frame, self.frames, self.features)
            mels.append(mel)
            waveforms.append(waveform)
        return {"mel": torch.stack(mels).float(), "waveform": torch.stack(waveforms).float()}
