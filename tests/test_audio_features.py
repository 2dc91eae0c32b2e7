"""model/audio/features.py against torchaudio's transforms and closed forms."""

import dataclasses
import math

import pytest
import torch
import torchaudio

from model.audio.features import (WINDOWS, AudioFeatureConfig, istft, log_mel, magnitude_from_mel, mel_filterbank,
                                  num_frames, num_samples, speech_end, stft)

CONFIGS = {
    "default": AudioFeatureConfig(),
    "htk_unnormalised": AudioFeatureConfig(mel_scale="htk", mel_norm=None),
    "short_window_band_limited": AudioFeatureConfig(sample_rate=22050, n_mels=64, n_fft=512, hop_length=128,
                                                    win_length=400, f_min=50.0, f_max=8000.0),
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference_log_mel(waveform: torch.Tensor, cfg: AudioFeatureConfig) -> torch.Tensor:
    """torchaudio's MelSpectrogram (magnitude, centred, reflect) and a clamped natural log."""
    transform = torchaudio.transforms.MelSpectrogram(
        sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
        f_min=cfg.f_min, f_max=cfg.f_max, n_mels=cfg.n_mels, power=1.0, center=True, pad_mode="reflect",
        norm=cfg.mel_norm, mel_scale=cfg.mel_scale).to(waveform.device)
    return torch.log(torch.clamp(transform(waveform), min=cfg.log_floor))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_log_mel_matches_torchaudio(name, device):
    cfg = CONFIGS[name]
    waveform = 0.3 * torch.randn(2, 5000, generator=torch.Generator().manual_seed(0)).to(device)
    mel = log_mel(waveform, cfg)
    assert mel.shape == (2, cfg.n_mels, num_frames(5000, cfg)) and mel.dtype == torch.float32
    torch.testing.assert_close(mel, reference_log_mel(waveform, cfg), atol=1e-4, rtol=1e-4)


def slaney_hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    """Slaney's Auditory Toolbox mel scale: linear (3 / 200 per Hz) below 1 kHz, logarithmic above."""
    return torch.where(f < 1000, 3 * f / 200, 15 + 27 * torch.log(f / 1000) / math.log(6.4))


def slaney_mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return torch.where(m < 15, 200 * m / 3, 1000 * torch.exp((m - 15) * math.log(6.4) / 27))


def test_filterbank_is_the_closed_form_slaney_triangles():
    cfg = AudioFeatureConfig()
    f = torch.arange(cfg.n_freqs, dtype=torch.float64) * cfg.sample_rate / cfg.n_fft
    edges = slaney_mel_to_hz(torch.linspace(float(slaney_hz_to_mel(torch.tensor(cfg.f_min))),
                                            float(slaney_hz_to_mel(torch.tensor(cfg.f_max))),
                                            cfg.n_mels + 2, dtype=torch.float64))
    left, centre, right = edges[:-2], edges[1:-1], edges[2:]
    rising = (f[:, None] - left) / (centre - left)
    falling = (right - f[:, None]) / (right - centre)
    expected = torch.clamp(torch.minimum(rising, falling), min=0) * 2 / (right - left)  # unit-area triangles
    torch.testing.assert_close(mel_filterbank(cfg, torch.device("cpu")).double(), expected, atol=1e-6, rtol=1e-4)
    assert float(slaney_hz_to_mel(torch.tensor(1000.0))) == pytest.approx(15.0)


def test_log_mel_of_a_bin_centred_sine_is_closed_form():
    """A cosine of amplitude A at bin k under a periodic Hann window of N points has STFT magnitude A·N/4 at
    bin k and A·N/8 at bins k ± 1 and nothing elsewhere, in every frame away from the edges."""
    cfg, k, amplitude = AudioFeatureConfig(), 40, 0.5
    t = torch.arange(16000, dtype=torch.float64)
    waveform = (amplitude * torch.cos(2 * math.pi * k * t / cfg.n_fft)).float()[None]
    magnitude = torch.zeros(cfg.n_freqs, dtype=torch.float64)
    magnitude[k] = amplitude * cfg.n_fft / 4
    magnitude[k - 1] = magnitude[k + 1] = amplitude * cfg.n_fft / 8
    expected = torch.log(torch.clamp(magnitude @ mel_filterbank(cfg, torch.device("cpu")).double(), min=1e-5))
    mel = log_mel(waveform, cfg)[0]
    for frame in (10, 30, 50):
        torch.testing.assert_close(mel[:, frame].double(), expected, atol=2e-3, rtol=0)
    assert int(mel[:, 30].argmax()) == int(expected.argmax())


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("length", [1500, 4096, 4097, 5119])
def test_istft_inverts_stft_for_any_length(name, length):
    cfg = CONFIGS[name]
    waveform = torch.randn(3, length, generator=torch.Generator().manual_seed(length))
    spec = stft(waveform, cfg)
    assert spec.shape == (3, cfg.n_freqs, num_frames(length, cfg)) and spec.dtype == torch.complex64
    full = istft(spec, cfg, length=length)
    torch.testing.assert_close(full, waveform, atol=1e-5, rtol=1e-5)
    default = istft(spec, cfg)
    assert default.shape[-1] == num_samples(spec.shape[-1], cfg) == length - length % cfg.hop_length
    torch.testing.assert_close(default, waveform[:, :default.shape[-1]], atol=1e-5, rtol=1e-5)


def test_stft_matches_torchaudio_spectrogram_and_frame_count_formula():
    cfg = CONFIGS["short_window_band_limited"]
    waveform = torch.randn(2, 3001)
    reference = torchaudio.transforms.Spectrogram(n_fft=cfg.n_fft, win_length=cfg.win_length,
                                                  hop_length=cfg.hop_length, power=None)(waveform)
    torch.testing.assert_close(stft(waveform, cfg), reference)
    for length in range(cfg.n_fft // 2 + 1, 3000, 97):
        frame_centres = range(0, length + 1, cfg.hop_length)  # frame t is centred on sample t * hop
        assert log_mel(torch.zeros(length), cfg).shape == (cfg.n_mels, len(frame_centres))
        assert num_frames(length, cfg) == len(frame_centres)


def test_bfloat16_input_and_autocast_are_computed_in_float32():
    cfg = AudioFeatureConfig()
    waveform = 0.2 * torch.randn(2, 4000)
    reference = log_mel(waveform.bfloat16().float(), cfg)
    mel = log_mel(waveform.bfloat16(), cfg)
    assert mel.dtype == torch.float32
    torch.testing.assert_close(mel, reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = log_mel(waveform, cfg)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, log_mel(waveform, cfg))


def test_leading_dimensions_are_kept():
    cfg = AudioFeatureConfig()
    waveform = torch.randn(2, 3, 2000)
    mel = log_mel(waveform, cfg)
    assert mel.shape == (2, 3, cfg.n_mels, num_frames(2000, cfg))
    torch.testing.assert_close(mel[1, 2], log_mel(waveform[1, 2], cfg))


def test_windows_are_shared_per_size_device_and_dtype():
    first = WINDOWS.hann(1024, "cpu")
    assert WINDOWS.hann(1024, torch.device("cpu")) is first
    assert WINDOWS.hann(1024, "cpu", torch.float64) is not first
    assert WINDOWS.hann(512, "cpu") is not first
    torch.testing.assert_close(first, torch.hann_window(1024))


def test_config_resolves_defaults_and_round_trips():
    cfg = AudioFeatureConfig(sample_rate=24000, n_fft=2048)
    assert cfg.win_length == 2048 and cfg.f_max == 12000.0 and cfg.n_freqs == 1025
    assert AudioFeatureConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_mels = 100


@pytest.mark.parametrize("values, message", [
    ({"win_length": 2048}, "win_length=2048 must be at most n_fft"),
    ({"hop_length": 2000}, "hop_length=2000 must be at most win_length"),
    ({"f_max": 9000.0}, "f_max <= sample_rate / 2"),
    ({"n_mels": 0}, "'n_mels' must be a positive integer"),
    ({"mel_scale": "bark"}, "mel_scale must be one of htk, slaney"),
    ({"mel_norm": "area"}, "mel_norm must be null or 'slaney'"),
    ({"log_floor": 0.0}, "log_floor must be positive"),
    ({"n_mel": 80}, "unknown audio feature key"),
])
def test_bad_config_values_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        AudioFeatureConfig.from_dict(values)


def test_bad_inputs_say_what_to_do():
    cfg = AudioFeatureConfig()
    with pytest.raises(ValueError, match="more than n_fft // 2 = 512"):
        log_mel(torch.zeros(1, 512), cfg)
    with pytest.raises(ValueError, match=r"stft expects a waveform \(B, S\)"):
        stft(torch.zeros(1, 1, 2000), cfg)
    with pytest.raises(ValueError, match="complex spectrogram"):
        istft(torch.zeros(1, cfg.n_freqs, 10), cfg)
    with pytest.raises(ValueError, match="complex spectrogram"):
        istft(torch.zeros(1, 100, 10, dtype=torch.complex64), cfg)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_magnitude_from_mel_is_torchaudios_inverse_mel_scale(name):
    """The least-squares magnitude (the vocoders' magnitude prior) equals torchaudio's InverseMelScale (lstsq,
    clamped at zero) up to our floor, and re-analysing it gives back the mel it came from."""
    cfg = CONFIGS[name]
    waveform = 0.3 * torch.randn(2, 6000, generator=torch.Generator().manual_seed(1))
    mel = log_mel(waveform, cfg)
    magnitude = magnitude_from_mel(mel, cfg)
    assert magnitude.shape == (2, cfg.n_freqs, mel.shape[-1]) and magnitude.min() >= cfg.log_floor
    reference = torchaudio.transforms.InverseMelScale(cfg.n_freqs, cfg.n_mels, cfg.sample_rate, cfg.f_min, cfg.f_max,
                                                      norm=cfg.mel_norm, mel_scale=cfg.mel_scale, driver="gelsd")
    expected = torch.clamp(reference(torch.exp(mel)), min=cfg.log_floor)
    torch.testing.assert_close(magnitude, expected, atol=1e-4 * expected.max().item(), rtol=1e-3)
    banks = mel_filterbank(cfg, torch.device("cpu"))
    reanalysed = torch.log(torch.clamp(torch.einsum("fm,bft->bmt", banks, magnitude), min=cfg.log_floor))
    assert (reanalysed - mel).abs().mean() < 0.05


@pytest.mark.parametrize("tail_db, kept", [(-50.0, True), (-70.0, False)])
def test_speech_end_cuts_silence_and_keeps_a_tail_within_top_db(tail_db, kept):
    """A loud tone (0.5 s), a quiet one (0.25 s, tail_db below it), then digital silence padded to 2 s: the cut
    falls at the end of the last tone within 60 dB, give or take the frames whose window straddles the edge."""
    cfg = AudioFeatureConfig()
    rate, hop = cfg.sample_rate, cfg.hop_length
    t = torch.arange(rate // 2) / rate
    loud = 0.5 * torch.sin(2 * math.pi * 440 * t)
    quiet = loud[: rate // 4] * 10 ** (tail_db / 20)
    waveform = torch.cat([loud, quiet, torch.zeros(2 * rate - loud.numel() - quiet.numel())])
    mel = log_mel(waveform, cfg)
    end_of_sound = (loud.numel() + (quiet.numel() if kept else 0)) / hop
    straddling = cfg.n_fft // (2 * hop) + 1
    assert abs(speech_end(mel) - end_of_sound) <= straddling
    assert speech_end(mel, top_db=80.0) >= (loud.numel() + quiet.numel()) / hop - straddling  # a wider range keeps both


def test_speech_end_of_pure_silence_keeps_everything_and_refuses_bad_input():
    silence = torch.full((80, 12), math.log(1e-5))
    assert speech_end(silence) == 12  # every frame is as loud as the loudest
    with pytest.raises(ValueError, match="one log-mel"):
        speech_end(silence[None])
    with pytest.raises(ValueError, match="one log-mel"):
        speech_end(silence[:, :0])
    with pytest.raises(ValueError, match="top_db must be positive"):
        speech_end(silence, top_db=0)
