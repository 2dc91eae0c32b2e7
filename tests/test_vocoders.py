"""Frequency-domain vocoders: registry, shapes and lengths, dtypes, parity with Vocos, a short overfit."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.audio.criteria import mel_l1_loss
from model.audio.features import log_mel, magnitude_from_mel, num_samples, stft
from model.audio.vocoders import (FrequencyDomainVocoder, LightHeadedFrequencyDomainVocoder,
                                  SplitBandFrequencyDomainVocoder, VocoderConfig, VocoderWithLoss, build_vocoder,
                                  model_config_lookup)
from model.audio.vocoders.backbone import ConvNeXtBackbone
from model.pretrained import load_weights, save_pretrained

NAMES = sorted(model_config_lookup)
TINY = "tiny_lightheaded_freq_domain_vocoder"


def speech_like(seconds: float = 0.5, sample_rate: int = 16000, seed: int = 0) -> torch.Tensor:
    """A voiced-speech stand-in (1, S): harmonics of a gliding 120-180 Hz pitch under a slow envelope, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 120 + 60 * t / seconds
    phase = 2 * math.pi * torch.cumsum(f0, 0) / sample_rate
    voiced = sum(torch.sin(k * phase) / k for k in range(1, 20))
    envelope = 0.5 + 0.5 * torch.sin(2 * math.pi * 3 * t)
    return (0.2 * envelope * voiced + 0.01 * torch.randn(t.shape, generator=generator))[None]


def test_registry_has_the_named_configs_and_each_loads_its_type():
    assert {"tiny_lightheaded_freq_domain_vocoder", "tiny_splitband_freq_domain_vocoder",
            "small_freq_domain_vocoder"} <= set(NAMES)
    classes = {"freq_domain": FrequencyDomainVocoder, "lightheaded": LightHeadedFrequencyDomainVocoder,
               "splitband": SplitBandFrequencyDomainVocoder}
    for name in NAMES:
        config = model_config_lookup[name]
        assert config.name == name and type(build_vocoder(config)) is classes[config.vocoder_type]
    with pytest.raises(ValueError, match="unknown config name 'tiny_vocoder'.*available"):
        model_config_lookup["tiny_vocoder"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_config_runs_forward_and_backward(name, dtype):
    torch.manual_seed(0)
    vocoder = build_vocoder(name).to(dtype)
    config = vocoder.config
    mel = log_mel(0.1 * torch.randn(2, 9 * config.hop_length), config.features)  # T = 10 frames
    waveform, spec = vocoder(mel)
    assert waveform.shape == (2, 9 * config.hop_length) and waveform.dtype == torch.float32
    assert spec.shape == (2, config.n_fft // 2 + 1, 10) and spec.is_complex()
    (waveform.square().mean() + spec.abs().mean()).backward()
    for parameter_name, parameter in vocoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == dtype, parameter_name
        assert torch.isfinite(parameter.grad).all(), parameter_name
    assert any(p.grad.abs().sum() > 0 for p in vocoder.head.parameters())


def test_bfloat16_weights_track_float32():
    torch.manual_seed(0)
    vocoder = build_vocoder(TINY)
    mel = log_mel(speech_like(0.25), vocoder.config.features)
    with torch.no_grad():
        reference = vocoder(mel)[0]
        low_precision = vocoder.to(torch.bfloat16)(mel)[0]
    error = torch.linalg.vector_norm(low_precision - reference) / torch.linalg.vector_norm(reference)
    assert error < 0.1


@pytest.mark.parametrize("length", [513, 600, 2048, 2049, 3000, 4351])
def test_output_length_follows_the_mel_frames_for_any_input_length(length):
    vocoder = build_vocoder(TINY)
    clip = torch.randn(1, length)
    mel = log_mel(clip, vocoder.config.features)
    with torch.no_grad():
        waveform, spec = vocoder(mel)
    hop = vocoder.config.hop_length
    assert waveform.shape[-1] == num_samples(mel.shape[-1], vocoder.config.features) == length - length % hop
    assert spec.shape[-1] == mel.shape[-1]
    with_loss = VocoderWithLoss(vocoder)
    if waveform.shape[-1] < with_loss.min_samples:
        with pytest.raises(ValueError, match="use longer segments"):
            with_loss(mel, clip)
        return
    with torch.no_grad():  # the clip the mel came from is the target: its first (T - 1) * hop samples
        output = with_loss(mel, clip)
    torch.testing.assert_close(output.waveform, waveform, rtol=0, atol=0)
    expected = mel_l1_loss(waveform, clip[:, :waveform.shape[-1]], vocoder.config.features)
    torch.testing.assert_close(output.losses["mel_l1"], expected, rtol=1e-6, atol=0)


class OracleHead(nn.Module):
    """A head that returns a fixed log-magnitude and phase components (B, F, T), ignoring the backbone."""

    def __init__(self, spec: torch.Tensor):
        super().__init__()
        self.spec = spec

    def forward(self, hidden):
        return torch.log(self.spec.abs().clamp(min=1e-12)), self.spec.real, self.spec.imag


@pytest.mark.parametrize("length", [3000, 4096])
def test_predicted_stft_frames_are_aligned_with_the_mel_frames(length):
    """With the clip's own STFT (torch.stft) as the heads' output, the vocoder returns the clip itself:
    the predicted frame t is centred on sample t * hop, as the mel frame t is."""
    vocoder = build_vocoder(TINY)
    clip = speech_like(0.5)[:, :length]
    vocoder.head = OracleHead(stft(clip, vocoder.features))
    waveform, _ = vocoder(log_mel(clip, vocoder.features))
    torch.testing.assert_close(waveform, clip[:, :waveform.shape[-1]], atol=1e-5, rtol=1e-4)


def test_backbone_matches_vocos_with_the_same_weights():
    from vocos.models import VocosBackbone

    torch.manual_seed(0)
    ours, reference = ConvNeXtBackbone(80, 64, 192, 3), VocosBackbone(80, 64, 192, 3)
    assert [tuple(t.shape) for t in ours.state_dict().values()] == \
        [tuple(t.shape) for t in reference.state_dict().values()]
    with torch.no_grad():
        for mine, theirs in zip(ours.state_dict().values(), reference.state_dict().values()):
            mine.copy_(torch.randn_like(theirs) * 0.1)
            theirs.copy_(mine)
    mel = torch.randn(2, 80, 12)
    torch.testing.assert_close(ours(mel), reference(mel))


def test_small_vocoder_is_the_size_of_vocos():
    from vocos.heads import ISTFTHead
    from vocos.models import VocosBackbone

    config = model_config_lookup["small_freq_domain_vocoder"]
    ours = sum(p.numel() for p in build_vocoder(config).parameters())
    vocos = sum(p.numel() for module in (VocosBackbone(80, 512, 1536, 8), ISTFTHead(512, 1024, 256))
                for p in module.parameters())
    assert abs(ours - 13.5e6) / 13.5e6 < 0.15
    assert abs(ours - vocos) / vocos < 0.05  # the phase head predicts real and imaginary parts: one extra Linear


def test_light_heads_are_smaller_and_split_band_heads_own_their_bins():
    full = build_vocoder(VocoderConfig(dim=128, intermediate_dim=256, n_layers=1))
    light = build_vocoder(VocoderConfig(vocoder_type="lightheaded", dim=128, intermediate_dim=256, n_layers=1,
                                        head_dim=32))
    head_size = lambda model: sum(p.numel() for p in model.head.parameters())
    assert head_size(light) < head_size(full) / 3

    torch.manual_seed(0)
    split = build_vocoder(VocoderConfig(vocoder_type="splitband", dim=64, intermediate_dim=128, n_layers=1,
                                        split_frequency=2000.0))
    k = split.config.split_bin
    assert k == 128  # 2000 Hz / (16000 Hz / 1024)
    mel = torch.randn(1, 80, 6)
    before = split.predict(mel)
    with torch.no_grad():
        for p in split.head.high.parameters():
            p.add_(0.5)
    after = split.predict(mel)
    torch.testing.assert_close(after.log_magnitude[:, :k], before.log_magnitude[:, :k])
    torch.testing.assert_close(after.phase[:, :k], before.phase[:, :k])
    assert (after.log_magnitude[:, k:] - before.log_magnitude[:, k:]).abs().min() > 0


def test_log_magnitude_is_bounded():
    vocoder = build_vocoder(TINY)
    with torch.no_grad():
        for p in vocoder.head.magnitude.parameters():
            p.fill_(10.0)
    prediction = vocoder.predict(torch.randn(1, 80, 4))
    assert prediction.log_magnitude.max() <= vocoder.config.max_log_magnitude
    assert torch.isfinite(prediction.waveform).all()


@pytest.mark.parametrize("name", ["tiny_lightheaded_freq_domain_vocoder", "tiny_splitband_freq_domain_vocoder"])
def test_magnitude_prior_starts_the_magnitude_at_the_mels_least_squares_inverse(name):
    """With magnitude_prior the untrained vocoder's log-magnitude is the (bounded) log of magnitude_from_mel; the
    head then learns a correction: after one gradient step the magnitude moves off the prior."""
    config = VocoderConfig.from_name(name).with_overrides(["magnitude_prior=true"])
    vocoder = build_vocoder(config)
    clip = speech_like(0.25)
    mel = log_mel(clip, config.features)
    prior = torch.log(magnitude_from_mel(mel, config.features))
    bound = config.max_log_magnitude
    torch.testing.assert_close(vocoder.predict(mel).log_magnitude, bound - F.softplus(bound - prior))
    plain = build_vocoder(VocoderConfig.from_name(name))
    assert (plain.predict(mel).log_magnitude - prior).abs().mean() > 1.0  # without the prior it starts elsewhere
    model = VocoderWithLoss(vocoder)
    model(mel, clip).losses["total"].backward()
    torch.optim.SGD(vocoder.parameters(), lr=0.1).step()
    assert (vocoder.predict(mel).log_magnitude - (bound - F.softplus(bound - prior))).abs().max() > 1e-4


def test_config_round_trips_through_yaml_and_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    vocoder = build_vocoder(TINY).eval()
    save_pretrained(vocoder, tmp_path / "vocoder")
    config = VocoderConfig.from_yaml(tmp_path / "vocoder" / "config.yaml")
    assert config == vocoder.config
    restored = build_vocoder(config).eval()
    load_weights(restored, tmp_path / "vocoder" / "model.safetensors")
    mel = torch.randn(1, 80, 5)
    torch.testing.assert_close(restored(mel)[0], vocoder(mel)[0])
    assert VocoderConfig.from_name(TINY).with_overrides(["sample_rate=24000"]).f_max == 12000.0


@pytest.mark.parametrize("values, message", [
    ({"vocoder_type": "lightheaded"}, "lightheaded needs head_dim"),
    ({"head_dim": 64}, "use vocoder_type=lightheaded"),
    ({"vocoder_type": "splitband", "split_frequency": 8000.0}, "split_frequency=8000.0 Hz must fall strictly"),
    ({"vocoder_type": "wavenet"}, "'vocoder_type' must be one of freq_domain, lightheaded, splitband"),
    ({"discriminators": ["mpd", "mbd"]}, "discriminators must be a list of distinct names from mpd, msd, mrd"),
    ({"stft_resolutions": [[512, 128, 1024]]}, "stft_resolutions must be a non-empty list"),
    ({"hop_length": 2048}, "hop_length=2048 must be at most win_length"),
    ({"mel_loss_weight": -1.0}, "'mel_loss_weight' must not be negative"),
    ({"mel_loss_weight": 0.0, "stft_loss_weight": 0.0, "phase_loss_weight": 0.0}, "at least one of mel_loss"),
    ({"n_layer": 4}, "unknown config key 'n_layer'; did you mean n_layers"),
])
def test_bad_configs_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        VocoderConfig.from_dict(values)


def test_bad_inputs_are_named():
    model = VocoderWithLoss(build_vocoder(TINY))
    with pytest.raises(ValueError, match=r"expects a log-mel \(B, n_mels=80, T >= 2\), got shape \(1, 64, 10\)"):
        model.vocoder(torch.randn(1, 64, 10))
    with pytest.raises(ValueError, match="does not match mel.*crop both together"):
        model(torch.randn(1, 80, 10), torch.randn(1, 5000))
    assert model.min_samples == 2048 // 2 + 1  # the largest STFT loss resolution
    with pytest.raises(ValueError, match="generated 768 samples.*at least 1025.*use longer segments"):
        model(log_mel(torch.randn(1, 800), model.config.features), torch.randn(1, 800))


def test_tiny_vocoder_overfits_one_clip():
    """Thirty AdamW steps on one 0.25 s clip lower the mel L1 well below its starting value."""
    torch.manual_seed(0)
    model = VocoderWithLoss(build_vocoder(TINY))
    clip = speech_like(0.25)
    mel = log_mel(clip, model.config.features)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for _ in range(30):
        losses = model(mel, clip).losses
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        history.append(losses["mel_l1"].item())
    assert history[-1] < 0.6 * history[0], history


def test_losses_under_bfloat16_autocast_are_float32_and_track_float32():
    torch.manual_seed(0)
    model = VocoderWithLoss(build_vocoder(TINY))
    clip = speech_like(0.25)
    mel = log_mel(clip, model.config.features)
    reference = model(mel, clip).losses
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(mel, clip).losses
    losses["total"].backward()
    for key, value in losses.items():
        assert value.dtype == torch.float32, key
        assert abs(value.item() - reference[key].item()) < 0.05 * abs(reference[key].item()) + 1e-3, key
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocoder_and_discriminator_train_on_cuda(dtype):
    from model.audio.vocoders import build_discriminator

    torch.manual_seed(0)
    config = model_config_lookup["tiny_splitband_freq_domain_vocoder"]
    model = VocoderWithLoss(build_vocoder(config)).to("cuda", dtype)
    discriminator = build_discriminator(config).to("cuda", dtype)
    clip = speech_like(0.25).cuda()
    out = model(log_mel(clip, config.features), clip)
    assert out.waveform.device.type == "cuda" and out.waveform.dtype == torch.float32
    real, fake = discriminator(clip[:, :out.waveform.shape[-1]]), discriminator(out.waveform)
    generator_terms = model.generator_adversarial_loss(fake.logits, real.features, fake.features)
    (out.losses["total"] + generator_terms["total"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
