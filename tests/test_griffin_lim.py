"""The Griffin-Lim baseline on our log-mel: it is torchaudio's InverseMelScale + GriffinLim wired to exactly our
features (checked against torchaudio's own transforms built independently), its mel inversion is consistent with
our filterbank, its audio has the mel it was given, and bad input is a clear error."""

import pytest
import torch
import torchaudio

from model.audio.features import log_mel, mel_filterbank, num_samples
from model.audio.griffin_lim import GriffinLimVocoder
from model.audio.vocoders.config import VocoderConfig
from test_vocoder_training import TINY, tone

CONFIG = VocoderConfig.from_name(TINY)


def test_matches_torchaudio_transforms_built_from_our_features():
    features = CONFIG.features
    waveform = torch.stack([tone(0.8, seed=1), tone(0.8, seed=2)])  # (2, 12800)
    mel = log_mel(waveform, features)  # (2, 80, 51)
    generated, spec = GriffinLimVocoder(CONFIG, n_iter=8)(mel)
    assert spec is None and generated.shape == (2, num_samples(mel.shape[-1], features)) == (2, 12800)
    inverse = torchaudio.transforms.InverseMelScale(513, 80, 16000, 0.0, 8000.0, norm="slaney", mel_scale="slaney",
                                                    driver="gelsd")
    reference = torchaudio.transforms.GriffinLim(1024, n_iter=8, win_length=1024, hop_length=256, power=1.0,
                                                 length=12800, rand_init=False)
    torch.testing.assert_close(generated, reference(inverse(mel.exp())), atol=1e-5, rtol=1e-4)


def test_the_mel_inversion_is_consistent_and_the_audio_has_the_given_mel():
    features = CONFIG.features
    waveform = tone(1.0, seed=5)
    mel = log_mel(waveform, features)
    vocoder = GriffinLimVocoder(CONFIG, n_iter=32)
    magnitude = vocoder.inverse_mel(mel.exp())  # (513, T): back through the filterbank gives the mel energies
    assert magnitude.min() >= 0
    energies = mel_filterbank(features, "cpu").T @ magnitude
    # measured 0.09: InverseMelScale clamps the negative parts of the least-squares solution to zero
    assert torch.linalg.vector_norm(energies - mel.exp()) / torch.linalg.vector_norm(mel.exp()) < 0.15
    generated = vocoder(mel[None])[0][0]
    error = (log_mel(generated, features) - mel).abs().mean()
    noise = (log_mel(torch.randn_like(waveform) * waveform.std(), features) - mel).abs().mean()
    assert error < 1.0 < noise  # measured: 0.44 for Griffin-Lim, 7.3 for noise of the same level


def test_other_features_and_bad_input():
    config = CONFIG.with_overrides(["n_mels=64", "n_fft=512", "hop_length=128"])
    features = config.features
    assert (features.n_mels, features.n_fft, features.hop_length) == (64, 512, 128)
    mel = log_mel(tone(0.5, seed=3), features)[None]
    assert GriffinLimVocoder(config, n_iter=2)(mel)[0].shape == (1, num_samples(mel.shape[-1], features))
    with pytest.raises(ValueError, match=r"log-mel \(B, n_mels=64, T >= 2\), got shape \(64, 63\)"):
        GriffinLimVocoder(config)(mel[0])
    with pytest.raises(ValueError, match="at least 1 iteration"):
        GriffinLimVocoder(config, n_iter=0)
    with pytest.raises(ValueError, match="momentum"):
        GriffinLimVocoder(config, momentum=1.0)
