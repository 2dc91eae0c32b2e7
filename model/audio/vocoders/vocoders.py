"""Vocoder registry, builders and the vocoder-with-loss wrapper that training scripts call.

    config = model_config_lookup["tiny_lightheaded_freq_domain_vocoder"]   # configs/vocoder/<name>.yaml
    model = VocoderWithLoss(build_vocoder(config))     # mel (B, 80, T) → waveform (B, (T - 1) * 256)
    vocoder = load_pretrained("runs/RUN/checkpoint-1000", "cuda", family="vocoder")   # model.pretrained
    discriminator = build_discriminator(config)
    out = model(mel, waveform)                         # out.waveform, out.stft, out.losses["total"], ...
    # discriminator step
    real, fake = discriminator(waveform[:, :out.waveform.shape[-1]]), discriminator(out.waveform.detach())
    model.discriminator_loss(real.logits, fake.logits).backward()
    # generator step (real features recomputed after the discriminator's update)
    real, fake = discriminator(waveform[:, :out.waveform.shape[-1]]), discriminator(out.waveform)
    gan = model.generator_adversarial_loss(fake.logits, real.features, fake.features)
    (out.losses["total"] + gan["total"]).backward()
"""

from typing import NamedTuple

import torch
from torch import nn

from model.audio.criteria import (MultiResolutionSTFTLoss, discriminator_adversarial_loss, feature_matching_loss,
                                  generator_adversarial_loss, group_delay_loss, instantaneous_frequency_loss,
                                  instantaneous_phase_loss, mel_l1_loss)
from model.audio.discriminators import (CombinedDiscriminator, MultiPeriodDiscriminator, MultiResolutionDiscriminator,
                                        MultiScaleDiscriminator)
from model.audio.features import num_frames, num_samples, stft
from model.audio.vocoders.base import (FrequencyDomainVocoder, FrequencyDomainVocoderBase,
                                       LightHeadedFrequencyDomainVocoder, SplitBandFrequencyDomainVocoder,
                                       VocoderPrediction)
from model.audio.vocoders.config import VocoderConfig

VOCODER_CLASSES = {
    "freq_domain": FrequencyDomainVocoder,
    "lightheaded": LightHeadedFrequencyDomainVocoder,
    "splitband": SplitBandFrequencyDomainVocoder,
}

model_config_lookup = VocoderConfig.registry()  # name → config, parsed when looked up


def build_vocoder(config: VocoderConfig | str) -> FrequencyDomainVocoderBase:
    """A freshly initialised vocoder of config.vocoder_type (a registry name or YAML path works too)."""
    if isinstance(config, str):
        config = VocoderConfig.from_name(config)
    return VOCODER_CLASSES[config.vocoder_type](config)


def build_discriminator(config: VocoderConfig) -> CombinedDiscriminator:
    """The discriminators listed in config.discriminators, in that order."""
    if not config.discriminators:
        raise ValueError(f"config '{config.name}' lists no discriminators: set discriminators to a list of "
                         "mpd, msd, mrd to train adversarially")
    builders = {
        "mpd": lambda: MultiPeriodDiscriminator(config.mpd_periods, config.discriminator_width),
        "msd": lambda: MultiScaleDiscriminator(config.msd_scales, config.discriminator_width),
        "mrd": lambda: MultiResolutionDiscriminator(config.mrd_fft_sizes, config.discriminator_width),
    }
    return CombinedDiscriminator([builders[name]() for name in config.discriminators])


class VocoderLossOutput(NamedTuple):
    waveform: torch.Tensor  # (B, (T - 1) * hop_length) float32
    stft: torch.Tensor  # (B, n_fft // 2 + 1, T) complex64
    losses: dict  # "total" (weighted sum) and each unweighted term, scalars


class VocoderWithLoss(nn.Module):
    """A vocoder and its reconstruction losses, weighted by its config.

    forward(mel (B, n_mels, T), waveform (B, S)) → VocoderLossOutput, where S is the length the mel came
    from (T == 1 + S // hop_length); the generated (T - 1) * hop_length samples are compared with the first
    as many samples of `waveform`. Terms with weight 0 are not computed.
    """

    def __init__(self, vocoder: FrequencyDomainVocoderBase):
        super().__init__()
        self.vocoder = vocoder
        self.config = vocoder.config
        self.stft_loss = MultiResolutionSTFTLoss(self.config.stft_resolutions)
        stft_sizes = [n_fft for n_fft, _, _ in self.config.stft_resolutions] if self.config.stft_loss_weight > 0 else []
        self.min_samples = max([self.config.n_fft] + stft_sizes) // 2 + 1  # centred STFTs need more than n_fft / 2

    def forward(self, mel: torch.Tensor, waveform: torch.Tensor) -> VocoderLossOutput:
        self._check_inputs(mel, waveform)
        prediction = self.vocoder.predict(mel)
        target = waveform[:, :prediction.waveform.shape[-1]].float()
        terms, weights = self._reconstruction_terms(prediction, target)
        total = sum(weights[key] * value for key, value in terms.items())
        return VocoderLossOutput(prediction.waveform, prediction.stft, {"total": total, **terms})

    def _check_inputs(self, mel: torch.Tensor, waveform: torch.Tensor) -> None:
        features = self.vocoder.features
        if waveform.dim() != 2 or mel.dim() != 3 or waveform.shape[0] != mel.shape[0] \
                or num_frames(waveform.shape[-1], features) != mel.shape[-1]:
            hop = features.hop_length
            raise ValueError(f"waveform {tuple(waveform.shape)} does not match mel {tuple(mel.shape)}: a mel of T "
                             f"frames comes from (B, S) samples with (T - 1) * {hop} <= S < T * {hop} "
                             "(features.num_frames); crop both together")
        generated = num_samples(mel.shape[-1], features)
        if generated < self.min_samples:
            raise ValueError(f"a mel of {mel.shape[-1]} frames generated {generated} samples; the losses' STFTs "
                             f"need at least {self.min_samples}: use longer segments")

    def _reconstruction_terms(self, prediction: VocoderPrediction, target: torch.Tensor) -> tuple[dict, dict]:
        """Each loss term with a positive weight (unweighted) and its weight."""
        c, terms, weights = self.config, {}, {}
        if c.mel_loss_weight > 0:
            terms["mel_l1"] = mel_l1_loss(prediction.waveform, target, self.vocoder.features)
            weights["mel_l1"] = c.mel_loss_weight
        if c.stft_loss_weight > 0:
            convergence, log_magnitude = self.stft_loss(prediction.waveform, target)
            terms["stft_spectral_convergence"], terms["stft_log_magnitude"] = convergence, log_magnitude
            weights["stft_spectral_convergence"] = weights["stft_log_magnitude"] = c.stft_loss_weight
        if c.phase_loss_weight > 0:
            target_phase = torch.angle(stft(target, self.vocoder.features))
            terms["phase_instantaneous"] = instantaneous_phase_loss(prediction.phase, target_phase)
            terms["phase_group_delay"] = group_delay_loss(prediction.phase, target_phase)
            terms["phase_instantaneous_frequency"] = instantaneous_frequency_loss(prediction.phase, target_phase)
            for key in ("phase_instantaneous", "phase_group_delay", "phase_instantaneous_frequency"):
                weights[key] = c.phase_loss_weight
        return terms, weights

    def generator_adversarial_loss(self, fake_logits: list, real_features: list, fake_features: list) -> dict:
        """The generator's GAN terms from the discriminator's outputs on real and generated audio:
        {"total": weighted sum, "adversarial": ..., "feature_matching": ...}."""
        adversarial = generator_adversarial_loss(fake_logits, self.config.adversarial_loss)
        matching = feature_matching_loss(real_features, fake_features)
        total = self.config.adversarial_loss_weight * adversarial + self.config.feature_matching_loss_weight * matching
        return {"total": total, "adversarial": adversarial, "feature_matching": matching}

    def discriminator_loss(self, real_logits: list, fake_logits: list) -> torch.Tensor:
        """The discriminator's loss (config.adversarial_loss) on real and generated (detached) audio."""
        return discriminator_adversarial_loss(real_logits, fake_logits, self.config.adversarial_loss)
