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
from model.audio.vocoders.config import VocoderConfig
from model.audio.vocoders.vocoders import VocoderWithLoss, build_vocoder
from model.image.diffusion import ImageDiffusionConfig, build_image_diffusion
from model.image.vae import ImageVAEConfig, build_image_vae
from model.megatransformer_causal import MegaTransformerCausalLM
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
    if len(fitting) != 1:
        which = "several config classes" if fitting else "no config class"
        raise ValueError(f"a config without model_family whose keys fit {which}: add model_family "
                         f"({', '.join(FAMILIES)}) to it")
    config_class = fitting[0]
    return config_class.FAMILIES[0]


def select_family(config: MegaTransformerConfig) -> str:
    """The language-model family pretrain_wm.py trains for `config`: recurrent when its name contains `recurrent` or
    it says `model_family: recurrent`, causal otherwise. This is the one place the rule lives: the multimodal
    family extends it here (several modalities, or a non-text one → multimodal)."""
    if config.model_family == "recurrent" or "recurrent" in (config.name or ""):
        return "recurrent"
    return "causal"
