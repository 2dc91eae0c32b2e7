"""data/vocoder_cache.py: aligned mel/waveform crops and resumable batches of them (no espeak needed)."""

import pytest
import torch

from data.vocoder_cache import SegmentBatches, crop_segment
from model.audio.features import log_mel, num_samples
from test_vocoder_training import FEATURES, HOP, tone, write_cache


def test_crop_pairs_mel_frames_with_the_samples_they_generate():
    waveform = tone(1.0, seed=0)
    item = {"waveform": waveform, "mel": log_mel(waveform, FEATURES)}
    first, frames = 7, 20
    mel, crop = crop_segment(item, first, frames, FEATURES)
    assert mel.shape == (80, frames) and crop.shape == (num_samples(frames, FEATURES),)
    torch.testing.assert_close(crop, waveform[first * HOP:(first + frames - 1) * HOP], rtol=0, atol=0)
    # the frames whose whole window lies inside the crop are the crop's own log-mel frames (centred framing)
    edge = FEATURES.n_fft // 2 // HOP
    own = log_mel(crop, FEATURES)
    torch.testing.assert_close(mel[:, edge:frames - edge], own[:, edge:frames - edge], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="does not fit"):
        crop_segment(item, item["mel"].shape[-1] - frames + 1, frames, FEATURES)


def test_a_clip_shorter_than_a_segment_is_zero_padded():
    waveform = tone(0.1, seed=1)  # 1600 samples: 7 frames
    mel, crop = crop_segment({"waveform": waveform, "mel": log_mel(waveform, FEATURES)}, 0, 20, FEATURES)
    assert crop.shape == (19 * HOP,)
    torch.testing.assert_close(crop[:1600], waveform, rtol=0, atol=0)
    assert not crop[1600:].any()
    torch.testing.assert_close(mel, log_mel(crop, FEATURES))


def test_segment_batches_are_a_pure_function_of_the_index(tmp_path):
    ramps = [torch.arange(12000 + 1000 * k, dtype=torch.float32) for k in range(5)]  # sample value = its index
    cache = write_cache(tmp_path / "cache", [ramp / 20000 for ramp in ramps])
    frames = 10

    def batches(rank=0):
        return SegmentBatches(cache, 2, frames, FEATURES, seed=5, rank=rank, world_size=2)

    first, again = batches(), batches()
    starts = set()
    for i in range(6):
        batch = first.batch(i)
        assert batch["mel"].shape == (2, 80, frames) and batch["waveform"].shape == (2, (frames - 1) * HOP)
        torch.testing.assert_close(batch, again.batch(i), rtol=0, atol=0)
        for waveform in batch["waveform"]:
            start = round(float(waveform[0]) * 20000)
            assert start % HOP == 0  # crops start on a frame
            starts.add(start)
    assert len(starts) > 3  # the offsets are drawn, not fixed
    assert not torch.equal(first.batch(0)["waveform"], batches(rank=1).batch(0)["waveform"])
