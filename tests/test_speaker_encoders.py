"""Speaker encoders: Resemblyzer's VoiceEncoder against Resemblyzer itself, a tiny local ECAPA-TDNN against
SpeechBrain's modules run by hand, and the messages for encoders that cannot be loaded."""

import shutil
import warnings

import pytest
import torch
import torchaudio

from model.audio.speaker_encoders import (OFFLINE_HELP, RESEMBLYZER, ResemblyzerEncoder, load_speaker_encoder,
                                          speaker_encoder_from_description)

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")

TINY_ECAPA_YAML = """
n_mels: 24
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>
mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False
embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [16, 16, 16, 16, 48]
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: 8
    lin_neurons: 12
classifier: !new:speechbrain.lobes.models.ECAPA_TDNN.Classifier
    input_size: 12
    out_neurons: 3
    lin_blocks: 0
    lin_neurons: 12
modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
    classifier: !ref <classifier>
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
        classifier: !ref <classifier>
    paths:
        embedding_model: DIRECTORY/embedding_model.ckpt
        classifier: DIRECTORY/classifier.ckpt
"""


def write_tiny_ecapa(directory, seed: int = 0):
    """A randomly initialised 12-dim ECAPA-TDNN saved as the hub repository lays it out (hyperparams.yaml and
    checkpoints); returns its embedding module (eval mode)."""
    from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN, Classifier

    torch.manual_seed(seed)
    embedding = ECAPA_TDNN(24, channels=[16, 16, 16, 16, 48], kernel_sizes=[5, 3, 3, 3, 1],
                           dilations=[1, 2, 3, 4, 1], attention_channels=8, lin_neurons=12)
    classifier = Classifier(12, out_neurons=3, lin_blocks=0, lin_neurons=12)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(embedding.state_dict(), directory / "embedding_model.ckpt")
    torch.save(classifier.state_dict(), directory / "classifier.ckpt")
    (directory / "hyperparams.yaml").write_text(TINY_ECAPA_YAML.replace("DIRECTORY", str(directory)))
    return embedding.eval()


def voiced(seconds: float, sample_rate: int, f0: float, seed: int) -> torch.Tensor:
    """A buzzy harmonic tone with a little noise, float32 (S,)."""
    t = torch.arange(round(seconds * sample_rate)) / sample_rate
    harmonics = sum(torch.sin(2 * torch.pi * f0 * k * t) / k for k in range(1, 8))
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))
    return (0.1 * harmonics * (1 + 0.5 * torch.sin(2 * torch.pi * 3 * t)) + 0.01 * noise).float()


def test_resemblyzer_matches_resemblyzer_itself():
    """Our torchaudio mel frames and partial windows give Resemblyzer's embed_utterance (librosa features) on the
    level-normalised waveform, for a clip shorter than one window and one of several windows."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from resemblyzer import VoiceEncoder
        from resemblyzer.audio import normalize_volume
    reference = VoiceEncoder("cpu", verbose=False)
    ours = ResemblyzerEncoder("cpu")
    for seconds, f0 in ((1.0, 120.0), (3.3, 210.0)):
        waveform = voiced(seconds, 16000, f0, seed=int(f0))
        expected = reference.embed_utterance(normalize_volume(waveform.numpy(), -30, increase_only=True))
        got = ours.embed([waveform], 16000)[0]
        assert got.shape == (256,)
        torch.testing.assert_close(got, torch.from_numpy(expected), atol=2e-3, rtol=0)
    assert ours.describe() == {"name": RESEMBLYZER, "dim": 256, "sample_rate": 16000}


@needs_espeak
def test_resemblyzer_tells_builtin_voices_apart():
    """Two sentences by one espeak-ng voice are closer (cosine) than the same sentence by two voices."""
    from data.builtin_speech import Utterance, synthesize

    def speak(voice: str, pitch: int, text: str) -> torch.Tensor:
        samples, rate = synthesize(Utterance("k", voice, 160, pitch, text))
        return torch.from_numpy(samples), rate

    encoder = load_speaker_encoder(RESEMBLYZER)
    clips = [speak("en-us", 45, "The quiet river found the golden lantern."),
             speak("en-us", 45, "Anna and Peter painted a wooden bicycle yesterday."),
             speak("en-gb-x-rp+f4", 70, "The quiet river found the golden lantern.")]
    a, a2, b = encoder.embed([clip for clip, _ in clips], clips[0][1])
    assert float(a @ a2) > float(a @ b)


def test_local_ecapa_gives_its_modules_embeddings(tmp_path):
    """A local ECAPA directory loads through SpeechBrain's EncoderClassifier; its embeddings equal Fbank ->
    sentence mean normalisation -> ECAPA_TDNN run by hand, for each clip of a zero-padded batch."""
    from speechbrain.lobes.features import Fbank

    module = write_tiny_ecapa(tmp_path / "ecapa")
    encoder = load_speaker_encoder(str(tmp_path / "ecapa"))
    assert encoder.dim == 12 and encoder.describe()["dim"] == 12
    clips = [voiced(1.0, 16000, 140.0, 1), voiced(1.5, 22050, 230.0, 2)]
    embeddings = encoder.embed(clips, 22050)
    assert embeddings.shape == (2, 12)
    features = Fbank(n_mels=24)(torchaudio.functional.resample(clips[1][None], 22050, 16000))
    with torch.no_grad():
        expected = module(features - features.mean(dim=1, keepdim=True)).flatten()
    torch.testing.assert_close(embeddings[1], expected, atol=1e-4, rtol=1e-4)
    again = speaker_encoder_from_description(encoder.describe())
    torch.testing.assert_close(again.embed(clips, 22050), embeddings)


def test_unloadable_speaker_encoders_say_what_works(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such directory.*--speaker_encoder resemblyzer"):
        load_speaker_encoder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no hyperparams.yaml"):
        load_speaker_encoder(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no speaker encoder given"):
        load_speaker_encoder("")
    # the hub: unreachable here (and forced so where it is reachable), failing at once with the alternatives
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    with pytest.raises(ValueError) as error:
        load_speaker_encoder("speechbrain/spkrec-ecapa-voxceleb")
    assert OFFLINE_HELP in str(error.value) and "--speaker_encoder" in str(error.value)
    write_tiny_ecapa(tmp_path / "ecapa")
    with pytest.raises(ValueError, match="now gives 12-dim embeddings but 192 were recorded"):
        speaker_encoder_from_description({"name": str(tmp_path / "ecapa"), "dim": 192})


def test_missing_resemblyzer_package_is_explained(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "resemblyzer" else real(name, *args))
    with pytest.raises(ValueError, match="pip install resemblyzer"):
        load_speaker_encoder(RESEMBLYZER)
