"""Vocoder losses against closed forms, discriminators' outputs, and VocoderWithLoss's weighting."""

import math

import pytest
import torch

from model.audio.criteria import (MultiResolutionSTFTLoss, anti_wrap, discriminator_adversarial_loss,
                                  feature_matching_loss, generator_adversarial_loss, group_delay_loss,
                                  instantaneous_frequency_loss, instantaneous_phase_loss, mel_l1_loss)
from model.audio.discriminators import (CombinedDiscriminator, MultiPeriodDiscriminator, MultiResolutionDiscriminator,
                                        MultiScaleDiscriminator)
from model.audio.features import AudioFeatureConfig, log_mel
from model.audio.vocoders import VocoderConfig, VocoderWithLoss, build_discriminator, build_vocoder

RESOLUTIONS = [[512, 128, 512], [1024, 256, 1024], [256, 64, 200]]


def noise(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_stft_loss_is_zero_for_identical_inputs_and_closed_form_for_a_rescaled_signal():
    """Ŷ = a·Y: spectral convergence ‖Y - aY‖/‖Y‖ = |1 - a| and mean |log aY - log Y| = |log a|
    (white noise keeps every magnitude far above the loss's floor)."""
    loss = MultiResolutionSTFTLoss(RESOLUTIONS)
    target = noise(2, 4000)
    convergence, log_magnitude = loss(target, target)
    assert float(convergence) == 0 and float(log_magnitude) == 0
    convergence, log_magnitude = loss(0.5 * target, target)
    assert float(convergence) == pytest.approx(0.5, abs=1e-4)
    assert float(log_magnitude) == pytest.approx(math.log(2), abs=1e-3)
    convergence, log_magnitude = loss(target + 0.1 * noise(2, 4000, seed=1), target)
    assert convergence > 0 and log_magnitude > 0


def test_mel_l1_is_zero_for_identical_inputs_and_log_of_the_gain_otherwise():
    cfg = AudioFeatureConfig()
    target = noise(2, 4000)
    assert float(mel_l1_loss(target, target, cfg)) == 0
    assert float(mel_l1_loss(2.0 * target, target, cfg)) == pytest.approx(math.log(2), abs=1e-4)
    assert mel_l1_loss(target.flip(-1), target, cfg) > 0


PHASE_LOSSES = [instantaneous_phase_loss, group_delay_loss, instantaneous_frequency_loss]


@pytest.mark.parametrize("loss", PHASE_LOSSES)
def test_phase_losses_are_zero_for_identical_phases_and_invariant_to_whole_turns(loss):
    phase = (torch.rand(2, 33, 20, generator=torch.Generator().manual_seed(0)) * 2 - 1) * math.pi
    other = (torch.rand(2, 33, 20, generator=torch.Generator().manual_seed(1)) * 2 - 1) * math.pi
    turns = 2 * math.pi * torch.randint(-3, 4, phase.shape, generator=torch.Generator().manual_seed(2))
    assert float(loss(phase, phase)) == 0
    assert float(loss(phase + turns, phase)) == pytest.approx(0, abs=1e-5)
    assert loss(other, phase) > 0
    assert float(loss(other + turns, phase)) == pytest.approx(float(loss(other, phase)), abs=1e-5)


def test_phase_losses_match_their_closed_forms():
    """A constant offset δ costs |δ| in instantaneous phase and nothing in the differences; a phase advancing by
    ω per frame costs |ω| in instantaneous frequency only across time; one advancing by ω per bin, only across
    frequency. Offsets beyond π wrap around: 3π/2 costs π/2."""
    phase = (torch.rand(1, 17, 9, generator=torch.Generator().manual_seed(0)) * 2 - 1) * math.pi
    assert float(instantaneous_phase_loss(phase + 0.7, phase)) == pytest.approx(0.7, abs=1e-5)
    assert float(instantaneous_phase_loss(phase + 1.5 * math.pi, phase)) == pytest.approx(0.5 * math.pi, abs=1e-5)
    assert float(group_delay_loss(phase + 0.7, phase)) == pytest.approx(0, abs=1e-5)
    assert float(instantaneous_frequency_loss(phase + 0.7, phase)) == pytest.approx(0, abs=1e-5)
    over_time = phase + 0.4 * torch.arange(9)
    assert float(instantaneous_frequency_loss(over_time, phase)) == pytest.approx(0.4, abs=1e-5)
    assert float(group_delay_loss(over_time, phase)) == pytest.approx(0, abs=1e-5)
    over_frequency = phase + 0.4 * torch.arange(17)[:, None]
    assert float(group_delay_loss(over_frequency, phase)) == pytest.approx(0.4, abs=1e-5)
    assert float(instantaneous_frequency_loss(over_frequency, phase)) == pytest.approx(0, abs=1e-5)
    torch.testing.assert_close(anti_wrap(torch.tensor([0.0, 3.0, 4.0, -7.0])),
                               torch.tensor([0.0, 3.0, 2 * math.pi - 4.0, 7.0 - 2 * math.pi]))


LOGITS_REAL = [torch.tensor([0.5, -2.0, 3.0]), torch.tensor([[1.5, 0.0]])]
LOGITS_FAKE = [torch.tensor([-0.5, 2.0, 0.0]), torch.tensor([[-1.5, 0.5]])]


def test_adversarial_losses_match_their_closed_forms():
    # generator, lsgan: mean (1 - D(G))², averaged over the two sub-discriminators
    expected = ((1.5 ** 2 + 1.0 + 1.0) / 3 + (2.5 ** 2 + 0.5 ** 2) / 2) / 2
    assert float(generator_adversarial_loss(LOGITS_FAKE, "lsgan")) == pytest.approx(expected)
    # generator, hinge: mean max(0, 1 - D(G))
    expected = ((1.5 + 0 + 1.0) / 3 + (2.5 + 0.5) / 2) / 2
    assert float(generator_adversarial_loss(LOGITS_FAKE, "hinge")) == pytest.approx(expected)
    # discriminator, lsgan: mean (1 - D(x))² + mean D(G)²
    first = (0.25 + 9.0 + 4.0) / 3 + (0.25 + 4.0 + 0.0) / 3
    second = (0.25 + 1.0) / 2 + (2.25 + 0.25) / 2
    loss = discriminator_adversarial_loss(LOGITS_REAL, LOGITS_FAKE, "lsgan")
    assert loss.item() == pytest.approx((first + second) / 2)
    # discriminator, hinge: mean max(0, 1 - D(x)) + mean max(0, 1 + D(G))
    first = (0.5 + 3.0 + 0.0) / 3 + (0.5 + 3.0 + 1.0) / 3
    second = (0.0 + 1.0) / 2 + (0.0 + 1.5) / 2
    loss = discriminator_adversarial_loss(LOGITS_REAL, LOGITS_FAKE, "hinge")
    assert loss.item() == pytest.approx((first + second) / 2)
    # a perfect discriminator's targets give zero loss
    perfect_real, perfect_fake = [torch.ones(4)], [-torch.ones(4)]
    assert float(discriminator_adversarial_loss(perfect_real, perfect_fake, "hinge")) == 0
    assert float(discriminator_adversarial_loss(perfect_real, [torch.zeros(4)], "lsgan")) == 0
    assert float(generator_adversarial_loss(perfect_real, "lsgan")) == 0


def test_adversarial_losses_reject_bad_arguments():
    with pytest.raises(ValueError, match="'lsgan' or 'hinge'"):
        generator_adversarial_loss(LOGITS_FAKE, "wgan")
    with pytest.raises(ValueError, match="non-empty list of logits"):
        generator_adversarial_loss([], "hinge")
    with pytest.raises(ValueError, match="logits of 2 sub-discriminators for real audio and 1"):
        discriminator_adversarial_loss(LOGITS_REAL, LOGITS_FAKE[:1], "hinge")


def test_feature_matching_is_the_mean_l1_and_trains_only_the_generator_side():
    real = [[torch.zeros(2, 3), torch.ones(4)], [torch.full((5,), 2.0)]]
    fake = [[torch.ones(2, 3, requires_grad=True), torch.ones(4)], [torch.full((5,), 0.5, requires_grad=True)]]
    assert float(feature_matching_loss(real, real)) == 0
    loss = feature_matching_loss(real, fake)
    assert loss.item() == pytest.approx(((1.0 + 0.0) + 1.5) / 2)
    real_leaf = real[0][0].requires_grad_()
    loss = feature_matching_loss(real, fake)
    loss.backward()
    assert real_leaf.grad is None and fake[0][0].grad is not None
    with pytest.raises(ValueError, match="same non-zero number of sub-discriminators"):
        feature_matching_loss(real, fake[:1])


@pytest.mark.parametrize("discriminator, count, layers", [
    (MultiPeriodDiscriminator((2, 3, 5, 7, 11), width=0.125), 5, 6),
    (MultiScaleDiscriminator(3, width=0.125), 3, 8),
    (MultiResolutionDiscriminator((1024, 512, 256), width=0.5), 3, 6),
])
def test_discriminators_give_logits_and_features_per_sub_discriminator(discriminator, count, layers):
    waveform = noise(2, 2000).requires_grad_()
    logits, features = discriminator(waveform)
    assert len(logits) == len(features) == len(discriminator.names) == count
    for score, maps in zip(logits, features):
        assert len(maps) == layers and maps[-1] is score and score.shape[:2] == (2, 1)
    sum(score.mean() for score in logits).backward()
    assert waveform.grad.abs().sum() > 0


def test_period_and_resolution_logits_have_the_folded_and_framed_shapes():
    waveform = noise(1, 4000)
    logits, _ = MultiPeriodDiscriminator((3, 7), width=0.125)(waveform)
    assert [score.shape[-1] for score in logits] == [3, 7]
    logits, _ = MultiResolutionDiscriminator((512,), width=0.5)(waveform)
    assert logits[0].shape[2] == 1 + 4000 // 128  # STFT frames at hop n_fft / 4


def test_combined_discriminator_concatenates_in_config_order_and_runs_in_bfloat16():
    config = VocoderConfig(discriminators=["mrd", "mpd", "msd"], mpd_periods=[2, 3], mrd_fft_sizes=[512],
                           msd_scales=1, discriminator_width=0.125)
    discriminator = build_discriminator(config)
    assert discriminator.names == ["mrd_fft512", "mpd_period2", "mpd_period3", "msd_scale0"]
    logits, features = discriminator.to(torch.bfloat16)(noise(2, 3000))
    assert len(logits) == len(features) == 4 and all(score.dtype == torch.bfloat16 for score in logits)
    loss = discriminator_adversarial_loss(logits, logits, "hinge")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"waveform \(B, S\)"):
        discriminator(noise(2, 1, 3000))
    with pytest.raises(ValueError, match="lists no discriminators"):
        build_discriminator(VocoderConfig(discriminators=[]))
    with pytest.raises(ValueError, match="at least one discriminator"):
        CombinedDiscriminator([])


def small_config(**values) -> VocoderConfig:
    return VocoderConfig(vocoder_type="lightheaded", dim=32, intermediate_dim=64, n_layers=1, head_dim=16,
                         discriminators=["mpd", "msd"], mpd_periods=[2, 3], msd_scales=2, discriminator_width=0.125,
                         **values)


def test_vocoder_with_loss_weights_its_terms_and_skips_zero_weights():
    torch.manual_seed(0)
    config = small_config(mel_loss_weight=3.0, stft_loss_weight=0.5, phase_loss_weight=0.0)
    model = VocoderWithLoss(build_vocoder(config))
    clip = 0.1 * noise(2, 3000)
    mel = log_mel(clip, config.features)
    out = model(mel, clip)
    assert set(out.losses) == {"total", "mel_l1", "stft_spectral_convergence", "stft_log_magnitude"}
    target = clip[:, :out.waveform.shape[-1]]
    mel_term = mel_l1_loss(out.waveform, target, config.features)
    convergence, log_magnitude = MultiResolutionSTFTLoss(config.stft_resolutions)(out.waveform, target)
    torch.testing.assert_close(out.losses["mel_l1"], mel_term)
    torch.testing.assert_close(out.losses["total"], 3.0 * mel_term + 0.5 * (convergence + log_magnitude))

    phase_only = VocoderWithLoss(build_vocoder(small_config(mel_loss_weight=0.0, stft_loss_weight=0.0)))
    losses = phase_only(mel, clip).losses
    assert set(losses) == {"total", "phase_instantaneous", "phase_group_delay", "phase_instantaneous_frequency"}
    torch.testing.assert_close(losses["total"], losses["phase_instantaneous"] + losses["phase_group_delay"]
                               + losses["phase_instantaneous_frequency"])


@pytest.mark.parametrize("kind", ["hinge", "lsgan"])
def test_vocoder_with_loss_adversarial_terms_train_generator_and_discriminator(kind):
    torch.manual_seed(0)
    config = small_config(adversarial_loss=kind, adversarial_loss_weight=1.5, feature_matching_loss_weight=2.0)
    model, discriminator = VocoderWithLoss(build_vocoder(config)), build_discriminator(config)
    clip = 0.1 * noise(2, 3000)
    out = model(log_mel(clip, config.features), clip)
    real_clip = clip[:, :out.waveform.shape[-1]]

    real, fake = discriminator(real_clip), discriminator(out.waveform.detach())
    d_loss = model.discriminator_loss(real.logits, fake.logits)
    torch.testing.assert_close(d_loss, discriminator_adversarial_loss(real.logits, fake.logits, kind))
    d_loss.backward()
    assert all(p.grad is not None for p in discriminator.parameters())
    assert all(p.grad is None for p in model.parameters())  # the generated audio was detached

    discriminator.zero_grad()
    real, fake = discriminator(real_clip), discriminator(out.waveform)
    g_terms = model.generator_adversarial_loss(fake.logits, real.features, fake.features)
    torch.testing.assert_close(g_terms["adversarial"], generator_adversarial_loss(fake.logits, kind))
    torch.testing.assert_close(g_terms["feature_matching"], feature_matching_loss(real.features, fake.features))
    torch.testing.assert_close(g_terms["total"], 1.5 * g_terms["adversarial"] + 2.0 * g_terms["feature_matching"])
    (out.losses["total"] + g_terms["total"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_losses_accept_bfloat16_and_reject_mismatched_shapes():
    cfg = AudioFeatureConfig()
    target = noise(1, 3000)
    loss = mel_l1_loss(target.bfloat16(), target, cfg)
    assert loss.dtype == torch.float32 and loss > 0
    phase = torch.zeros(1, 5, 4, dtype=torch.bfloat16)
    assert instantaneous_phase_loss(phase + 0.5, phase).dtype == torch.float32
    with pytest.raises(ValueError, match=r"mel_l1_loss: predicted \(1, 2000\) and target \(1, 3000\)"):
        mel_l1_loss(target[:, :2000], target, cfg)
    with pytest.raises(ValueError, match="same shape"):
        group_delay_loss(phase[:, :4], phase)
    with pytest.raises(ValueError, match="at least one"):
        MultiResolutionSTFTLoss([])
