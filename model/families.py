"""The model families: which config class reads a checkpoint's config.yaml and which module it builds.

    model = build_model(config)                  # the family config.model_family names, freshly initialised
    family = family_of(values)                   # values: a config.yaml mapping → its family name
    config.with_overrides([f"model_family={select_family(config)}"])   # what pretrain_wm.py trains

Every config records its `model_family` (megatransformer_utils.YamlConfig), so model/pretrained.py's
load_pretrained reads any checkpoint through FAMILIES. Adding a family (audio VAE, audio DiT, multimodal) is one
entry here: its config class (whose FAMILIES names the family and its configs/ folder) and the module a
checkpoint's model.safetensors holds.
"""

from dataclasses import dataclass
from typing import Callable

from torch import nn

from megatransformer_utils import MegaTransformerConfig, YamlConfig
from model.audio.diffusion import AudioDiffusionConfig, build_audio_diffusion
from model.audio.vae import AudioVAEConfig, build_audio_vae
from model.audio.vocoders.config import VocoderConfig
from model.audio.vocoders.vocoders import VocoderWithLoss, build_vocoder
from model.image.diffusion import ImageDiffusionConfig, build_image_diffusion
from model.image.vae import ImageVAEConfig, build_image_vae
from model.megatransformer_causal import MegaTransformerCausalLM
from model.megatransformer_multimodal import MegaTransformerMultimodal
from model.multimodal.config import MultimodalConfig
from model.megatransformer_recurrent import MegaTransformerRecurrentLM


@dataclass(frozen=True)
class ModelFamily:
    """config_class: reads the family's config.yaml. build(config): the module whose state dict a checkpoint's
    model.safetensors holds (what trains). unwrap(module): the model a caller of load_pretrained gets (a vocoder
    trains inside its loss wrapper, but vocodes alone)."""

    config_class: type
    build: Callable[[YamlConfig], nn.Module]
    unwrap: Callable[[nn.Module], nn.Module] = lambda module: module


FAMILIES = {
    "causal": ModelFamily(MegaTransformerConfig, MegaTransformerCausalLM),
    "recurrent": ModelFamily(MegaTransformerConfig, MegaTransformerRecurrentLM),
    "vocoder": ModelFamily(VocoderConfig, lambda config: VocoderWithLoss(build_vocoder(config)),
                           unwrap=lambda module: module.vocoder),
    "image_vae": ModelFamily(ImageVAEConfig, build_image_vae),
    "image_diffusion": ModelFamily(ImageDiffusionConfig, build_image_diffusion),
    "audio_vae": ModelFamily(AudioVAEConfig, build_audio_vae),
    "audio_diffusion": ModelFamily(AudioDiffusionConfig, build_audio_diffusion),
    "multimodal": ModelFamily(MultimodalConfig, MegaTransformerMultimodal),
}


def build_model(config: YamlConfig) -> nn.Module:
    """A freshly initialised model of the family config.model_family names (the module checkpoints hold)."""
    if config.model_family not in FAMILIES:
        raise ValueError(f"model_family {config.model_family!r} has no model: known families are "
                         f"{', '.join(FAMILIES)}")
    return FAMILIES[config.model_family].build(config)


def family_of(values: dict) -> str:
    """The family of a config.yaml mapping: its `model_family`, or for a config written before every family recorded
    one (vocoder, image VAE and DiT checkpoints), the family of the one config class that knows all its keys."""
    if values.get("model_family") is not None:
        if values["model_family"] not in FAMILIES:
            raise ValueError(f"model_family {values['model_family']!r} is not a known family: "
                             f"{', '.join(FAMILIES)}")
        return values["model_family"]
    classes = {family.config_class for family in FAMILIES.values()}
    fitting = [cls for cls in classes if set(values) <= set(cls.field_names())]
    # a class whose fields extend another's (the multimodal config extends the LM's) fits the other's files too:
    # keep the narrowest, the class whose fields every other fitting class has
    narrowest = [cls for cls in fitting if all(set(cls.field_names()) <= set(other.field_names()) for other in fitting)]
    fitting = narrowest or fitting
    if len(fitting) != 1:
        which = "several config classes" if fitting else "no config class"
        raise ValueError(f"a config without model_family whose keys fit {which}: add model_family "
                         f"({', '.join(FAMILIES)}) to it")
    config_class = fitting[0]
    return config_class.FAMILIES[0]


def select_family(config: MegaTransformerConfig) -> str:
    """The language-model family pretrain_wm.py trains for `config`: recurrent when its name contains `recurrent` or
    it says `model_family: recurrent`, causal otherwise. The multimodal rule comes first and works on the config's
    name, since a multimodal YAML is not a MegaTransformerConfig: model/megatransformer_multimodal.py's
    is_multimodal_config (several modalities, or a non-text one → multimodal), asked by pretrain_wm.py."""
    if config.model_family == "recurrent" or "recurrent" in (config.name or ""):
        return "recurrent"
    return "causal"
