"""Frequency-domain vocoders (mel → STFT magnitude and phase → iSTFT), their configs and loss wrapper."""

from model.audio.vocoders.base import (FrequencyDomainVocoder, FrequencyDomainVocoderBase,
                                       LightHeadedFrequencyDomainVocoder, SplitBandFrequencyDomainVocoder,
                                       VocoderPrediction)
from model.audio.vocoders.config import VocoderConfig
from model.audio.vocoders.vocoders import (VocoderLossOutput, VocoderWithLoss, build_discriminator, build_vocoder,
                                           model_config_lookup)

__all__ = ["FrequencyDomainVocoder", "FrequencyDomainVocoderBase", "LightHeadedFrequencyDomainVocoder",
           "SplitBandFrequencyDomainVocoder", "VocoderPrediction", "VocoderConfig", "VocoderLossOutput",
           "VocoderWithLoss", "build_discriminator", "build_vocoder", "model_config_lookup"]
