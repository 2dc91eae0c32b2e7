"""Batches of the utterance caches written by preprocess_audio_diffusion_dataset.py, for the audio VAE and the
audio DiT.

    train, val = open_utterance_caches("cached_datasets/phrases_train_diffusion_cached", "..._val_...")
    batch = crop_or_pad_mels(items, frames=240, pad_value=math.log(1e-5), generator=g)   # the VAE's fixed crops
    batch = pad_utterances(items, multiple=8, pad_value=...)                            # the DiT's whole utterances

Items hold "mel" (n_mels, T_i), "speaker_embedding" (S,) and "text_emb" (L_i, D) (see the preprocessor).
"""

import torch

from data.sharded_cache import ShardedCache

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
    {"mel": (B, n_mels, T) float32, "frame_mask": (B, T) bool (True = a real frame), "speaker_embedding": (B, S),
     "text_emb": (B, L, D) zero-padded, "text_mask": (B, L) bool}."""
    lengths = [item["mel"].shape[-1] for item in items]
    frames = -(-max(lengths) // multiple) * multiple
    mel = torch.stack([torch.nn.functional.pad(item["mel"].float(), (0, frames - length), value=pad_value)
                       for item, length in zip(items, lengths)])
    frame_mask = torch.arange(frames)[None] < torch.tensor(lengths)[:, None]
    text_lengths = [item["text_emb"].shape[0] for item in items]
    text = torch.zeros(len(items), max(text_lengths), items[0]["text_emb"].shape[1])
    text_mask = torch.zeros(len(items), max(text_lengths), dtype=torch.bool)
    for row, (item, length) in enumerate(zip(items, text_lengths)):
        text[row, :length] = item["text_emb"].float()
        text_mask[row, :length] = True
    return {"mel": mel, "frame_mask": frame_mask, "text_emb": text, "text_mask": text_mask,
            "speaker_embedding": torch.stack([item["speaker_embedding"].float() for item in items])}
