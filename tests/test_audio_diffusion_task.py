"""The audio-diffusion task's batches (training/audio_diffusion_task.py, data/audio_diffusion_batches.py): over VAE
latents every utterance is encoded once, alone, when the task is built, and no step runs the encoder; frame masks
follow each utterance's length; over mels the batches are the padded log-mels, as before."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from data.audio_diffusion_batches import encode_utterances, pad_latent_utterances, pad_utterances
from data.cached_batches import CachedBatches
from data.sharded_cache import ShardedCache, ShardedCacheWriter
from model.audio.diffusion import AudioDiffusionConfig, FrameCodec, build_audio_diffusion
from model.audio.vae import AudioVAEConfig, build_audio_vae
from training.audio_diffusion_task import build_audio_diffusion_task
from training.loop import RunContext

N_MELS, TEXT_DIM, SPEAKER_DIM, HOP, RATE = 80, 8, 16, 256, 16000
SILENCE = math.log(1e-5)
LENGTHS = [37, 64, 20, 57, 64, 9, 41, 30, 64, 33]  # mel frames: several share a padded length, one fills a patch


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """An utterance cache as preprocess_audio_diffusion_dataset.py writes one, LENGTHS[k] frames for item k, in
    shards of 4 (items 0-3, 4-7, 8-9)."""
    directory = tmp_path_factory.mktemp("utterances") / "cache"
    generator = torch.Generator().manual_seed(0)
    with ShardedCacheWriter(directory, items_per_shard=4) as writer:
        for index, frames in enumerate(LENGTHS):
            words = 1 + index % 3
            writer.add({"mel": torch.randn(N_MELS, frames, generator=generator) * 2 - 6, "frames": frames,
                        "text": "word " * words, "text_emb": torch.randn(words, TEXT_DIM, generator=generator),
                        "speaker_embedding": torch.randn(SPEAKER_DIM, generator=generator), "speaker": "s",
                        "source_id": f"utterance-{index}"})
        writer.finish({"made_by": "preprocess_audio_diffusion_dataset.py", "kind": "audio_diffusion",
                       "features": {"sample_rate": RATE, "n_mels": N_MELS, "hop_length": HOP, "log_floor": 1e-5},
                       "text_encoder": {"name": "random", "dim": TEXT_DIM, "max_length": 16},
                       "speaker_encoder": {"name": "random", "dim": SPEAKER_DIM},
                       "speaker_embedding_dim": SPEAKER_DIM, "mel_mean": -6.0, "mel_std": 2.0,
                       "seconds": sum(LENGTHS) * HOP / RATE, "mean_text_tokens": 2.0, "max_frames": max(LENGTHS)})
    return ShardedCache(directory, open_shards=4)


def latent_codec() -> FrameCodec:
    torch.manual_seed(0)
    vae = build_audio_vae(AudioVAEConfig.from_name("tiny").with_overrides(
        [f"speaker_embedding_dim={SPEAKER_DIM}", f"pad_value={SILENCE}"])).eval()
    return FrameCodec("latent", -6.0, 2.0, vae)


def dit(representation: str, channels: int, patch_size: int):
    config = AudioDiffusionConfig.from_name("tiny_dit").with_overrides(
        [f"representation={representation}", f"latent_channels={channels}", f"text_embed_dim={TEXT_DIM}",
         f"speaker_embedding_dim={SPEAKER_DIM}", f"patch_size={patch_size}", "hidden_size=32", "depth=1"])
    torch.manual_seed(0)
    return build_audio_diffusion(config), config


def task_args(**overrides) -> argparse.Namespace:
    values = dict(batch_size=4, seed=3, eval_batches=1, eval_steps=5, generation_steps=None, sample_clips=1,
                  sample_steps=1, vae_checkpoint=None)
    return argparse.Namespace(**{**values, **overrides})


def count_encoder_calls(monkeypatch, codec: FrameCodec) -> list:
    calls = []
    original = codec.vae.encode
    monkeypatch.setattr(codec.vae, "encode", lambda mel: calls.append(mel.shape) or original(mel))
    return calls


@pytest.mark.parametrize("multiple", [8, 32])
def test_pre_encoded_latents_equal_each_utterance_encoded_alone(cache, multiple):
    """Grouped by padded length, in windows and chunks that split the groups, each utterance's latents equal
    FrameCodec.encode of it alone (multiple 8 = r: the VAE's own padding; 32: padded with silence to 4 latent
    frames, whole patches of 4)."""
    codec = latent_codec()
    latents, mel_frames = encode_utterances(codec, cache, multiple, SILENCE, batch_size=2, window=6)
    assert mel_frames == LENGTHS
    for index, frames in enumerate(latents):
        mel = cache[index]["mel"]
        alone = codec.encode(F.pad(mel, (0, -(-mel.shape[-1] // multiple) * multiple - mel.shape[-1]),
                                   value=SILENCE)[None])[0]
        assert frames.shape == (40, -(-LENGTHS[index] // multiple) * multiple // 8)
        torch.testing.assert_close(frames, alone, atol=1e-5, rtol=1e-4)
        if multiple == 8:
            torch.testing.assert_close(frames, codec.encode(mel[None])[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="multiple of the codec's 8 mel frames"):
        encode_utterances(codec, cache, 12, SILENCE, batch_size=2)


def test_latent_batches_mask_the_frames_of_each_length():
    """Latents of 4 and 8 frames (patches of 4) for 20 and 57 mel frames (r = 8): zero-padded to 8, real on
    ceil(20 / 8) = 3 and ceil(57 / 8) = 8 frames; mel_frames and the conditions as pad_utterances gives them."""
    items = [{"latents": torch.randn(40, width), "mel": torch.zeros(N_MELS, frames), "text_emb": torch.randn(words, 8),
              "speaker_embedding": torch.randn(SPEAKER_DIM)} for width, frames, words in ((4, 20, 2), (8, 57, 3))]
    batch = pad_latent_utterances(items, multiple=4, frames_per_step=8)
    assert batch["latents"].shape == (2, 40, 8)
    torch.testing.assert_close(batch["latents"][0, :, :4], items[0]["latents"])
    assert not batch["latents"][0, :, 4:].any()
    assert batch["frame_mask"].tolist() == [[True] * 3 + [False] * 5, [True] * 8]
    assert batch["mel_frames"].tolist() == [20, 57]
    assert batch["text_mask"].tolist() == [[True, True, False], [True] * 3]
    mel_batch = pad_utterances(items, multiple=4, pad_value=SILENCE)
    for key in ("mel_frames", "text_emb", "text_mask", "speaker_embedding"):
        torch.testing.assert_close(batch[key], mel_batch[key])


def test_latent_steps_use_the_latents_encoded_when_the_task_was_built(cache, tmp_path, monkeypatch):
    """Building encodes each train and validation utterance once (and sets the latent scale: unit variance over
    the real frames); training steps, evaluation and a rebuilt task's batches (exact resume) never call the
    encoder, and a batch holds each utterance's own latents, scaled, with its frame mask."""
    codec = latent_codec()
    calls = count_encoder_calls(monkeypatch, codec)
    model, config = dit("latent", 40, patch_size=2)
    context = RunContext(torch.device("cpu"), tmp_path / "run", 0, 1)
    args = task_args()
    task = build_audio_diffusion_task(model, config, cache, cache, codec, None, args, context)
    assert sum(shape[0] for shape in calls) == len(LENGTHS) + args.eval_batches * args.batch_size
    assert task.extra_state.run_meta["latent_scale"] == codec.latent_scale
    unscaled, _ = encode_utterances(FrameCodec("latent", -6.0, 2.0, codec.vae), cache, 16, SILENCE, batch_size=4)
    real = torch.cat([frames[:, :-(-length // 8)].flatten() for frames, length in zip(unscaled, LENGTHS)])
    assert codec.latent_scale == pytest.approx(1 / float(real.std()), rel=1e-5)
    indices = CachedBatches(cache, args.batch_size, args.seed, 0, 1, list).indices(1)
    alone = [codec.encode(F.pad(cache[k]["mel"], (0, -(-LENGTHS[k] // 16) * 16 - LENGTHS[k]), value=SILENCE)[None])[0]
             for k in indices]
    calls.clear()
    batch = task.train_batch(1)
    assert "mel" not in batch and batch["latents"].shape[-1] == max(-(-LENGTHS[k] // 16) * 2 for k in indices)
    for row, index in enumerate(indices):
        width = -(-LENGTHS[index] // 16) * 2  # padded to whole patches of 2 latent frames (16 mel frames)
        torch.testing.assert_close(batch["latents"][row, :, :width], alone[row], atol=1e-5, rtol=1e-4)
        assert not batch["latents"][row, :, width:].any()
        assert batch["frame_mask"][row].tolist() == [k < -(-LENGTHS[index] // 8)
                                                     for k in range(batch["latents"].shape[-1])]
    assert batch["mel_frames"].tolist() == [LENGTHS[k] for k in indices]
    assert task.batch_size(batch) == pytest.approx(sum(LENGTHS[k] for k in indices) * HOP / RATE)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for step in range(2):
        terms = task.loss(model, task.train_batch(step), step)
        terms.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(terms.loss)
    assert set(task.evaluate(model)) == {"eval/loss", "eval/mse", "eval/ema_loss"}
    assert calls == []
    resumed = build_audio_diffusion_task(dit("latent", 40, patch_size=2)[0], config, cache, cache,
                                         FrameCodec("latent", -6.0, 2.0, codec.vae), None, args, context)
    calls.clear()
    torch.testing.assert_close(resumed.train_batch(1), batch)
    assert calls == []


def test_mel_batches_are_the_padded_log_mels(cache, tmp_path):
    """Without a VAE a batch is pad_utterances of the micro-batch's items (silence to a multiple of the patch)
    and the loss runs on them normalised."""
    model, config = dit("mel", N_MELS, patch_size=4)
    args = task_args()
    task = build_audio_diffusion_task(model, config, cache, cache, FrameCodec("mel", -6.0, 2.0), None, args,
                                      RunContext(torch.device("cpu"), tmp_path / "run", 0, 1))
    indices = CachedBatches(cache, args.batch_size, args.seed, 0, 1, list).indices(2)
    expected = pad_utterances([cache[index] for index in indices], 4, SILENCE)
    batch = task.train_batch(2)
    assert set(batch) == set(expected) | {"index"}
    for key, value in expected.items():
        torch.testing.assert_close(batch[key], value)
    assert torch.isfinite(task.loss(model, batch, 0).loss)
