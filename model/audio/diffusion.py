"""Audio diffusion: a DiT (model/diffusion/dit.py) over mel frames or audio-VAE latents, conditioned on text
(cross-attention, padding masked) and a speaker (its embedding projected into the timestep conditioning).

    config = AudioDiffusionConfig.from_name("small_dit")         # configs/audio_diffusion/small_dit.yaml
    model = build_audio_diffusion(config)
    loss, logs = audio_diffusion_loss(model, x0, text_emb, text_mask, speaker, frame_mask)
    denoiser = GuidedAudioDenoiser(model, speaker, frame_mask, text_scale=3.0, speaker_scale=1.5)
    x = sample(denoiser, (B, config.latent_channels, T), text_emb, text_mask, guidance_scale=1.0)

The input is one sequence of frames x: (B, channels, T): normalised log-mel frames (representation "mel",
channels = n_mels) or audio-VAE latents with their frequency rows stacked into channels (representation "latent",
channels = C * n_mels / F). Patches are patch_size frames (patch_height 1); T must be a multiple of patch_size.
Variable lengths: frame_mask (B, T) marks the real frames; a patch is real when any of its frames is; the
self-attention reads only real patches and the loss counts only real frames.

Classifier-free guidance for text and speaker: training drops the text (cfg_dropout) and, independently, the
speaker (speaker_dropout; the learned null speaker replaces it). Sampling combines three predictions,

    e = e(-, -) + text_scale * (e(text, -) - e(-, -)) + speaker_scale * (e(text, speaker) - e(text, -))

(scales 1 and 1 give the fully conditional model alone, in one pass).
"""

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from model.diffusion.config import DiffusionConfig
from model.diffusion.dit import DiT
from model.diffusion.guidance import condition_dropout_mask
from model.diffusion.objectives import add_noise, min_snr_weight, sample_noise_levels, training_target
from model.diffusion.samplers import sample
from model.diffusion.schedules import noise_schedule

REPRESENTATIONS = ("mel", "latent")


@dataclasses.dataclass
class AudioDiffusionConfig(DiffusionConfig):
    """A DiffusionConfig over frame sequences (B, latent_channels, T), plus the speaker conditioning."""

    FAMILIES: ClassVar[tuple] = ("audio_diffusion",)
    CHOICES: ClassVar[dict] = {**DiffusionConfig.CHOICES, "representation": REPRESENTATIONS}

    representation: str = "mel"  # what a frame is: a normalised log-mel frame or a stacked VAE latent frame
    speaker_embedding_dim: int = 192  # 0: no speaker conditioning
    speaker_dropout: float = 0.1  # probability of training a row with the null speaker
    speaker_guidance_scale: float = 1.5

    def resolve_derived(self) -> None:
        if self.patch_height is None:  # frames: one row (image configs derive it from patch_size)
            self.patch_height = 1

    def validate(self) -> None:
        super().validate()
        if self.patch_height != 1:
            raise ValueError(f"audio diffusion runs over frame sequences (B, C, T): patch_height must be 1, "
                             f"got {self.patch_height}")
        if self.speaker_embedding_dim < 0:
            raise ValueError(f"config key 'speaker_embedding_dim' must be 0 (no speaker) or positive, "
                             f"got {self.speaker_embedding_dim}")
        if not 0.0 <= self.speaker_dropout < 1.0:
            raise ValueError(f"config key 'speaker_dropout' must be in [0, 1), got {self.speaker_dropout}")
        if self.speaker_guidance_scale < 0:
            raise ValueError(f"config key 'speaker_guidance_scale' must not be negative, "
                             f"got {self.speaker_guidance_scale}")


model_config_lookup = AudioDiffusionConfig.registry()  # name → config, parsed when looked up


def build_audio_diffusion(config: AudioDiffusionConfig) -> "AudioDiT":
    """A freshly initialised audio DiT (zero output until trained, see dit.py)."""
    return AudioDiT(config)


class AudioDiT(DiT):
    """The DiT with a speaker projection into its conditioning and frame masks. See the module docstring."""

    def __init__(self, config: AudioDiffusionConfig):
        super().__init__(config)
        self.speaker_proj = None
        if config.speaker_embedding_dim:
            self.speaker_proj = nn.Linear(config.speaker_embedding_dim, config.hidden_size)
            nn.init.normal_(self.speaker_proj.weight, std=0.02)
            nn.init.zeros_(self.speaker_proj.bias)
            self.null_speaker_embedding = nn.Parameter(torch.randn(config.speaker_embedding_dim) /
                                                       config.speaker_embedding_dim ** 0.5)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, text_emb: torch.Tensor, text_mask: torch.Tensor,
                drop_condition: torch.Tensor | None = None, speaker: torch.Tensor | None = None,
                drop_speaker: torch.Tensor | None = None, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, latent_channels, T), T a multiple of patch_size; timesteps, text_emb, text_mask, drop_condition
        as DiT.forward; speaker: (B, speaker_embedding_dim) (required when the config has one); drop_speaker: (B,)
        bool, rows that get the null speaker; frame_mask: (B, T) bool or None. Returns the prediction (B, C, T)."""
        if x.ndim != 3:
            raise ValueError(f"audio diffusion input must be (B, channels, T), got {tuple(x.shape)}")
        batch, _, frames = x.shape
        if frames % self.config.patch_size:
            raise ValueError(f"{frames} frames are not a multiple of patch_size={self.config.patch_size}: pad them "
                             "(and mark the padding in frame_mask)")
        token_mask = None
        if frame_mask is not None:
            if frame_mask.shape != (batch, frames):
                raise ValueError(f"frame_mask must be (B, T) = ({batch}, {frames}), got {tuple(frame_mask.shape)}")
            token_mask = frame_mask.bool().view(batch, -1, self.config.patch_size).any(-1)
        extra = self._speaker_condition(speaker, drop_speaker, batch)
        return super().forward(x, timesteps, text_emb, text_mask, drop_condition, extra_condition=extra,
                               token_mask=token_mask)

    def _speaker_condition(self, speaker: torch.Tensor | None, drop_speaker: torch.Tensor | None,
                           batch: int) -> torch.Tensor | None:
        dim = self.config.speaker_embedding_dim
        if self.speaker_proj is None:
            if speaker is not None:
                raise ValueError(f"config '{self.config.name}' has speaker_embedding_dim 0 but a speaker was given")
            return None
        if speaker is None or speaker.shape != (batch, dim):
            got = None if speaker is None else tuple(speaker.shape)
            raise ValueError(f"speaker embedding has shape {got}, the model expects ({batch}, {dim}) "
                             f"(speaker_embedding_dim={dim} of config '{self.config.name}'): use the speaker encoder "
                             "the model was trained with")
        dtype = self.speaker_proj.weight.dtype
        speaker = speaker.to(dtype)
        if drop_speaker is not None:
            speaker = torch.where(drop_speaker.bool()[:, None], self.null_speaker_embedding.to(dtype)[None], speaker)
        return self.speaker_proj(speaker)


def audio_diffusion_loss(model, x0: torch.Tensor, text_emb: torch.Tensor, text_mask: torch.Tensor,
                         speaker: torch.Tensor | None, frame_mask: torch.Tensor | None,
                         generator: torch.Generator | None = None, cfg_dropout: float | None = None,
                         speaker_dropout: float | None = None) -> tuple[torch.Tensor, dict]:
    """model/diffusion/loss.py's diffusion_loss for frame sequences: noise x0 (B, C, T) at random levels, drop
    text and speaker for classifier-free guidance, and regress on the objective's target, the squared error
    averaged over real frames only (frame_mask (B, T), or all), float32, min-SNR weighted when configured.
    model: an AudioDiT (or DeepSpeed's engine around one, with the DiT's config as `.config`).
    Returns (loss, {"mse", "loss_weight", "cfg_dropped", "speaker_dropped"}) (detached scalars in logs)."""
    config = model.config
    batch, device = x0.shape[0], x0.device
    x0 = x0.float()
    schedule = noise_schedule(config.schedule, config.num_train_timesteps, config.beta_start, config.beta_end)
    alpha, sigma, model_timesteps = sample_noise_levels(config.objective, schedule, batch, device, generator)
    noise = torch.randn(x0.shape, generator=generator, device=device)
    drop = condition_dropout_mask(batch, config.cfg_dropout if cfg_dropout is None else cfg_dropout, device, generator)
    drop_speaker = condition_dropout_mask(batch, config.speaker_dropout if speaker_dropout is None else
                                          speaker_dropout, device, generator)
    output = model(add_noise(x0, noise, alpha, sigma), model_timesteps, text_emb, text_mask, drop_condition=drop,
                   speaker=speaker, drop_speaker=drop_speaker if speaker is not None else None, frame_mask=frame_mask)
    target = training_target(config.objective, x0, noise, alpha, sigma)
    error = (output.float() - target).square().mean(1)  # (B, T)
    mask = torch.ones_like(error) if frame_mask is None else frame_mask.to(error.dtype)
    mse = (error * mask).sum(1) / mask.sum(1).clamp(min=1)
    weight = torch.ones_like(mse) if config.min_snr_gamma is None else \
        min_snr_weight(config.objective, alpha, sigma, config.min_snr_gamma)
    logs = {"mse": mse.mean().detach(), "loss_weight": weight.mean().detach(), "cfg_dropped": drop.float().mean(),
            "speaker_dropped": drop_speaker.float().mean() if speaker is not None else torch.zeros((), device=device)}
    return (weight * mse).mean(), logs


class GuidedAudioDenoiser:
    """A denoiser for model/diffusion/samplers.sample (called with guidance_scale=1) that applies the text and
    speaker guidance of the module docstring itself. speaker: (B, S) or None; frame_mask: (B, T) or None."""

    def __init__(self, model: AudioDiT, speaker: torch.Tensor | None, frame_mask: torch.Tensor | None,
                 text_scale: float, speaker_scale: float):
        self.model, self.config = model, model.config
        self.speaker, self.frame_mask = speaker, frame_mask
        self.text_scale, self.speaker_scale = text_scale, speaker_scale

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, text_emb: torch.Tensor, text_mask: torch.Tensor,
                 drop_condition: torch.Tensor | None = None) -> torch.Tensor:
        if self.text_scale == 1.0 and (self.speaker is None or self.speaker_scale == 1.0):
            return self.model(x, timesteps, text_emb, text_mask, speaker=self.speaker, frame_mask=self.frame_mask)
        batch = x.shape[0]
        copies = 3 if self.speaker is not None else 2

        def repeat(tensor):
            return None if tensor is None else torch.cat([tensor] * copies)

        rows = torch.arange(copies * batch, device=x.device)
        drop_text = rows >= (copies - 1) * batch  # the last copy: no text
        drop_speaker = rows >= batch  # every copy but the first: no speaker
        output = self.model(repeat(x), repeat(timesteps), repeat(text_emb), repeat(text_mask),
                            drop_condition=drop_text, speaker=repeat(self.speaker),
                            drop_speaker=drop_speaker if self.speaker is not None else None,
                            frame_mask=repeat(self.frame_mask)).float()
        predictions = output.chunk(copies)
        unconditional, text_only = predictions[-1], predictions[-2]
        guided = unconditional + self.text_scale * (text_only - unconditional)
        if self.speaker is not None:
            guided = guided + self.speaker_scale * (predictions[0] - text_only)
        return guided


class FrameCodec:
    """Log-mels <-> the DiT's frame sequences. "mel": frames are (mel - mel_mean) / mel_std. "latent": frames are
    the VAE posterior means (B, C, n_mels / F, T / r) times latent_scale, frequency rows stacked into channels
    (B, C * n_mels / F, T / r); decoding runs the VAE decoder with the speaker."""

    def __init__(self, representation: str, mel_mean: float, mel_std: float, vae=None, latent_scale: float = 1.0):
        if representation not in REPRESENTATIONS:
            raise ValueError(f"representation must be one of {', '.join(REPRESENTATIONS)}, got {representation!r}")
        if representation == "latent" and vae is None:
            raise ValueError("the latent representation needs the audio VAE: pass --vae_checkpoint")
        self.representation, self.mel_mean, self.mel_std = representation, mel_mean, mel_std
        self.vae, self.latent_scale = (vae, latent_scale) if representation == "latent" else (None, 1.0)

    @property
    def frames_per_step(self) -> int:
        """Mel frames per frame of the sequence (the VAE's time downsampling r, or 1)."""
        return self.vae.config.time_downsample if self.vae is not None else 1

    def channels(self, n_mels: int) -> int:
        if self.vae is None:
            return n_mels
        return self.vae.config.latent_channels * self.vae.config.latent_mels

    def sequence_frames(self, mel_frames: torch.Tensor) -> torch.Tensor:
        """Mel frame counts (B,) -> frame counts of the sequence (B,): ceil(T / r)."""
        return -(-mel_frames // self.frames_per_step)

    @torch.no_grad()
    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, n_mels, T) raw log-mel (padded with silence) -> frames (B, channels, ceil(T / r)) float32."""
        if self.vae is None:
            return (mel.float() - self.mel_mean) / self.mel_std
        weights = next(self.vae.parameters())
        latents = self.vae.encode(mel[:, None].to(weights.device, weights.dtype)).mode().float()
        return latents.flatten(1, 2) * self.latent_scale

    @torch.no_grad()
    def decode(self, frames: torch.Tensor, speaker: torch.Tensor | None) -> torch.Tensor:
        """frames (B, channels, w) -> raw log-mel (B, n_mels, w * r) float32."""
        if self.vae is None:
            return frames.float() * self.mel_std + self.mel_mean
        config = self.vae.config
        latents = frames.float().unflatten(1, (config.latent_channels, config.latent_mels)) / self.latent_scale
        weights = next(self.vae.parameters())
        speaker = None if speaker is None else speaker.to(weights.device, weights.dtype)
        return self.vae.decode(latents.to(weights.device, weights.dtype), speaker)[:, 0].float()


def generate_mel(model, codec: FrameCodec, text_emb: torch.Tensor, speaker: torch.Tensor | None, mel_frames: int,
                 steps: int | None, seed: int, text_scale: float | None = None,
                 speaker_scale: float | None = None) -> torch.Tensor:
    """One utterance per row: text_emb (B, L, D) (all real tokens), speaker (B, S) or None -> log-mel
    (B, n_mels, mel_frames) float32, sampled from noise seeded by `seed` with the config's guidance scales unless
    given."""
    config, device = model.config, text_emb.device
    length = -(-codec.sequence_frames(torch.tensor(mel_frames)) // config.patch_size) * config.patch_size
    denoiser = GuidedAudioDenoiser(model, speaker if config.speaker_embedding_dim else None, None,
                                   config.guidance_scale if text_scale is None else text_scale,
                                   config.speaker_guidance_scale if speaker_scale is None else speaker_scale)
    generator = torch.Generator(device=device).manual_seed(seed)
    text_mask = torch.ones(text_emb.shape[:2], dtype=torch.bool, device=device)
    frames = sample(denoiser, (text_emb.shape[0], config.latent_channels, int(length)), text_emb, text_mask,
                    guidance_scale=1.0, steps=steps, generator=generator)
    return codec.decode(frames, speaker)[..., :mel_frames]
