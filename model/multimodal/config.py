"""MultimodalConfig: a MegaTransformerConfig (every backbone knob) plus the media it models and how they diffuse.

    config = MultimodalConfig.from_name("tiny")             # configs/multimodal/tiny.yaml
    config.media["image"]                                   # {"latent_channels": 4, "latent_height": 8, ...}
    config.begin_token_id("image"), config.end_token_id("image")

The text vocabulary is `vocab_size` (the tokenizer's); each media kind of `media` adds a begin and an end token
after it, in the order of MEDIA_KINDS, so the model's embedding and LM head hold `total_vocab_size` rows. A media
entry maps a kind of MEDIA_KINDS to its span settings (model/multimodal/media.py checks them): adding a modality
is one entry there and one here, not a new config class.

Diffusion over media spans uses the objective, schedule and samplers of model/diffusion/ with the same field
names as DiffusionConfig, so model/diffusion/samplers.sample reads them from this config directly.
"""

import dataclasses
from typing import ClassVar, Optional

from megatransformer_utils import CHOICES, MegaTransformerConfig
from model.diffusion.objectives import OBJECTIVES
from model.diffusion.samplers import SAMPLERS, SAMPLERS_FOR
from model.diffusion.schedules import SCHEDULES
from model.multimodal.media import MEDIA_KINDS, check_media_entry

BACKBONES = ("causal", "recurrent")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass
class MultimodalConfig(MegaTransformerConfig):
    """Architecture and diffusion settings of the multimodal world model. See configs/multimodal/."""

    FAMILIES: ClassVar[tuple] = ("multimodal",)
    CHOICES: ClassVar[dict] = {**CHOICES, "model_family": ("multimodal",), "objective": OBJECTIVES,
                               "schedule": SCHEDULES, "sampler": SAMPLERS, "backbone": BACKBONES}

    model_family: str = "multimodal"
    media: dict = dataclasses.field(default_factory=dict)  # kind -> its span settings (see media.py)
    # causal: n_layers blocks; recurrent: the recurrent-depth core (n_prelude_layers, n_recurrent_layers iterated,
    # n_coda_layers and the other recurrent_* keys; n_layers is then unused)
    backbone: str = "causal"

    # the loss: cross-entropy on text + diffusion_loss_weight * diffusion loss on media (Transfusion's lambda)
    diffusion_loss_weight: float = 5.0
    caption_dropout: float = 0.1  # rows of caption -> media trained without their caption (classifier-free guidance)
    caption_noise_cap: float = 0.5  # media before its caption: noise level at most this fraction of the maximum

    # the diffusion process (the fields and meanings of model/diffusion/config.py: DiffusionConfig)
    objective: str = "flow_matching"
    schedule: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    min_snr_gamma: Optional[float] = None
    sampler: str = "euler"
    sampling_steps: int = 25
    guidance_scale: float = 3.0
    flow_shift: float = 1.0

    def validate(self) -> None:
        super().validate()
        unknown = [kind for kind in self.media if kind not in MEDIA_KINDS]
        _require(not unknown, f"config key 'media' names unknown kinds {unknown}: valid kinds are "
                              f"{', '.join(MEDIA_KINDS)}")
        for kind, entry in self.media.items():
            check_media_entry(kind, entry, self.hidden_size)
        _require(self.diffusion_loss_weight >= 0,
                 f"config key 'diffusion_loss_weight' must not be negative, got {self.diffusion_loss_weight}")
        _require(0.0 <= self.caption_dropout < 1.0,
                 f"config key 'caption_dropout' must be in [0, 1), got {self.caption_dropout}")
        _require(0.0 < self.caption_noise_cap <= 1.0,
                 f"config key 'caption_noise_cap' must be in (0, 1], got {self.caption_noise_cap}")
        _require(self.num_train_timesteps >= 1 and 1 <= self.sampling_steps <= self.num_train_timesteps,
                 f"need 1 <= sampling_steps={self.sampling_steps} <= num_train_timesteps={self.num_train_timesteps}")
        _require(0 < self.beta_start <= self.beta_end < 1,
                 f"need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, beta_end={self.beta_end}")
        _require(self.min_snr_gamma is None or self.min_snr_gamma > 0,
                 f"config key 'min_snr_gamma' must be positive or null, got {self.min_snr_gamma}")
        _require(self.sampler in SAMPLERS_FOR[self.objective],
                 f"sampler '{self.sampler}' does not fit objective '{self.objective}': "
                 f"use {' or '.join(SAMPLERS_FOR[self.objective])}")
        _require(self.guidance_scale >= 0, f"config key 'guidance_scale' must not be negative, got {self.guidance_scale}")
        _require(self.flow_shift > 0, f"config key 'flow_shift' must be positive, got {self.flow_shift}")

    # ----- derived -----
    @property
    def media_kinds(self) -> list[str]:
        """The media of this config in token order (the order of MEDIA_KINDS)."""
        return [kind for kind in MEDIA_KINDS if kind in self.media]

    @property
    def total_vocab_size(self) -> int:
        """Rows of the embedding and the LM head: the text vocabulary plus a begin and an end token per media kind."""
        return self.vocab_size + 2 * len(self.media)

    def begin_token_id(self, kind: str) -> int:
        return self.vocab_size + 2 * self._media_index(kind)

    def end_token_id(self, kind: str) -> int:
        return self.begin_token_id(kind) + 1

    def kind_of_begin_token(self, token_id: int) -> Optional[str]:
        """The media kind whose begin token is `token_id`, or None for any other token."""
        for kind in self.media_kinds:
            if token_id == self.begin_token_id(kind):
                return kind
        return None

    def _media_index(self, kind: str) -> int:
        if kind not in self.media:
            raise ValueError(f"config '{self.name}' has no '{kind}' media (it models "
                             f"{', '.join(['text'] + self.media_kinds)}): add a '{kind}' entry to its media, or use "
                             "a config that has one")
        return self.media_kinds.index(kind)
