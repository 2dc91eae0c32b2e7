"""Batches of the utterance caches written by preprocess_audio_diffusion_dataset.py, for the audio VAE and the
audio DiT.

    train, val = open_utterance_caches("cached_datasets/phrases_train_diffusion_cached", "..._val_...")
    batch = crop_or_pad_mels(items, frames=240, pad_value=math.log(1e-5), generator=g)   # the VAE's fixed crops
    batch = pad_utterances(items, multiple=8, pad_value=...)                            # the DiT's whole utterances
    latents, mel_frames = encode_utterances(codec, train, multiple=32, pad_value=..., batch_size=32)
    batch = pad_latent_utterances(items_with_latents, multiple=4, frames_per_step=8)   # a latent DiT's utterances

A DiT over VAE latents encodes every utterance once (encode_utterances) and batches the latents, the item dicts
with their latents added under "latents".

Items hold "mel" (n_mels, T_i), "speaker_embedding" (S,) and "text_emb" (L_i, D) (see the preprocessor).
"""

from collections import defaultdict
from collections.abc import Sequence

import torch

from data.sharded_cache import ShardedCache
from model.audio.diffusion import FrameCodec

MADE_BY = "preprocess_audio_diffusion_dataset.py"
TRAIN_OPEN_SHARDS = 8
MATCHING_KEYS = ("features", "text_encoder", "speaker_encoder")


def open_utterance_caches(train_dir, val_dir) -> tuple[ShardedCache, ShardedCache]:
    """The train and validation caches, checked to be utterance caches made with the same features, text encoder
    and speaker encoder (ValueError / FileNotFoundError saying what to do)."""
    train = ShardedCache(train_dir, made_by=f"{MADE_BY} --split train", open_shards=TRAIN_OPEN_SHARDS)
    val = ShardedCache(val_dir, made_by=f"{MADE_BY} --split validation")
    for cache in (train, val):
        if cache.meta.get("kind") != "audio_diffusion":
            raise ValueError(f"{cache.directory} is not an utterance cache (its meta.json has kind "
                             f"{cache.meta.get('kind')!r}): write it with {MADE_BY}")
    for key in MATCHING_KEYS:
        if train.meta[key] != val.meta[key]:
            raise ValueError(f"the train cache {train.directory} and the validation cache {val.directory} differ in "
                             f"{key} ({train.meta[key]} vs {val.meta[key]}): write both with the same {MADE_BY} flags")
    return train, val


def check_speaker_embedding_dim(cache: ShardedCache, speaker_embedding_dim: int | None) -> int:
    """The cache's speaker embedding width; ValueError naming both when --speaker_embedding_dim disagrees."""
    recorded = int(cache.meta["speaker_embedding_dim"])
    if speaker_embedding_dim is not None and speaker_embedding_dim != recorded:
        raise ValueError(f"--speaker_embedding_dim {speaker_embedding_dim} does not match the cache {cache.directory}, "
                         f"whose speaker encoder {cache.meta['speaker_encoder']['name']} gives {recorded}-dim "
                         f"embeddings: pass --speaker_embedding_dim {recorded}, or rewrite the cache with a speaker "
                         f"encoder of width {speaker_embedding_dim}")
    return recorded


def crop_or_pad_mels(items: list[dict], frames: int, pad_value: float,
                     generator: torch.Generator | None) -> dict:
    """Items -> {"mel": (B, 1, n_mels, frames) float32, "speaker_embedding": (B, S) float32}: a longer mel is cut
    at an offset drawn from `generator` (from its start when None), a shorter one right-padded with pad_value."""
    mels = []
    for item in items:
        mel = item["mel"].float()
        extra = mel.shape[-1] - frames
        if extra > 0:
            start = 0 if generator is None else int(torch.randint(0, extra + 1, (), generator=generator))
            mel = mel[:, start:start + frames]
        mels.append(torch.nn.functional.pad(mel, (0, max(0, -extra)), value=pad_value))
    return {"mel": torch.stack(mels)[:, None],
            "speaker_embedding": torch.stack([item["speaker_embedding"].float() for item in items])}


def pad_utterances(items: list[dict], multiple: int, pad_value: float) -> dict:
    """Whole utterances, right-padded to the longest rounded up to `multiple` frames ->
    {"mel": (B, n_mels, T) float32, "frame_mask": (B, T) bool (True = a real frame), "mel_frames": (B,) int64,
     "speaker_embedding": (B, S), "text_emb": (B, L, D) zero-padded, "text_mask": (B, L) bool}."""
    lengths = [item["mel"].shape[-1] for item in items]
    frames = -(-max(lengths) // multiple) * multiple
    mel = torch.stack([torch.nn.functional.pad(item["mel"].float(), (0, frames - length), value=pad_value)
                       for item, length in zip(items, lengths)])
    frame_mask = torch.arange(frames)[None] < torch.tensor(lengths)[:, None]
    return {"mel": mel, "frame_mask": frame_mask, **_conditions(items)}


@torch.no_grad()
def encode_utterances(codec: FrameCodec, items: Sequence[dict], multiple: int, pad_value: float, batch_size: int,
                      window: int = 1024) -> tuple[list[torch.Tensor], list[int]]:
    """Every utterance of `items` (a cache, or a list of its items) through codec.encode, each as if alone: its
    mel (n_mels, T_k) right-padded with pad_value to a multiple of `multiple` mel frames (itself a multiple of the
    codec's frames_per_step r) -> (frames (channels, ceil(T_k / multiple) * multiple / r) float32 on the CPU,
    T_k) per utterance. Utterances of the same padded length among `window` consecutive items are encoded together,
    up to batch_size at a time (the encoder treats rows independently; reading the items in order loads each shard
    once)."""
    if multiple < 1 or multiple % codec.frames_per_step:
        raise ValueError(f"multiple must be a positive multiple of the codec's {codec.frames_per_step} mel frames "
                         f"per frame, got {multiple}")
    if batch_size < 1 or window < 1:
        raise ValueError(f"batch_size and window must be at least 1, got {batch_size} and {window}")
    encoded: list[torch.Tensor | None] = [None] * len(items)
    lengths = [0] * len(items)
    for first in range(0, len(items), window):
        mels = {index: items[index]["mel"] for index in range(first, min(first + window, len(items)))}
        by_length = defaultdict(list)
        for index, mel in mels.items():
            lengths[index] = mel.shape[-1]
            by_length[-(-mel.shape[-1] // multiple) * multiple].append(index)
        for length, indices in by_length.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                mel = torch.stack([torch.nn.functional.pad(mels[index].float(), (0, length - mels[index].shape[-1]),
                                                           value=pad_value) for index in chunk])
                for index, frames in zip(chunk, codec.encode(mel).cpu()):
                    encoded[index] = frames
    return encoded, lengths


def pad_latent_utterances(items: list[dict], multiple: int, frames_per_step: int) -> dict:
    """Items holding their pre-encoded "latents" (C, W_i) (encode_utterances) and their "mel" (n_mels, T_i) ->
    {"latents": (B, C, W) float32 zero-padded to the longest rounded up to `multiple` frames, "frame_mask": (B, W)
     bool (True on the ceil(T_i / frames_per_step) frames that hold audio), "mel_frames": (B,) int64 (T_i),
     "speaker_embedding", "text_emb", "text_mask" as pad_utterances}.
    When every W_i is a multiple of the DiT's patch the zeros fill whole patches, which its attention never reads."""
    widths = [item["latents"].shape[-1] for item in items]
    width = -(-max(widths) // multiple) * multiple
    latents = torch.stack([torch.nn.functional.pad(item["latents"].float(), (0, width - own))
                           for item, own in zip(items, widths)])
    audio = [-(-item["mel"].shape[-1] // frames_per_step) for item in items]
    frame_mask = torch.arange(width)[None] < torch.tensor(audio)[:, None]
    return {"latents": latents, "frame_mask": frame_mask, **_conditions(items)}


def _conditions(items: list[dict]) -> dict:
    """{"mel_frames": (B,) int64, "speaker_embedding": (B, S) float32, "text_emb": (B, L, D) zero-padded,
    "text_mask": (B, L) bool} of a batch of items."""
    text_lengths = [item["text_emb"].shape[0] for item in items]
    text = torch.zeros(len(items), max(text_lengths), items[0]["text_emb"].shape[1])
    text_mask = torch.zeros(len(items), max(text_lengths), dtype=torch.bool)
    for row, (item, length) in enumerate(zip(items, text_lengths)):
        text[row, :length] = item["text_emb"].float()
        text_mask[row, :length] = True
    return {"mel_frames": torch.tensor([item["mel"].shape[-1] for item in items]), "text_emb": text,
            "text_mask": text_mask, "speaker_embedding": torch.stack([item["speaker_embedding"].float()
                                                                      for item in items])}
