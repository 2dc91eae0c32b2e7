"""Loading the audio generation runs: the audio VAE of pretrain_audio_vae.py and the DiT of
pretrain_audio_diffusion.py (both through model/pretrained.py's family table); and text-to-speech with a DiT run.

    vae = load_audio_vae_checkpoint("runs/audio_vae_run/checkpoint-XXX")                  # XXX: a saved step
    dit, meta = load_audio_diffusion_checkpoint("runs/diffusion_run/checkpoint-XXX")       # EMA weights + run facts
    tts = TextToSpeech("runs/diffusion_run/checkpoint-XXX", "runs/vocoder/checkpoint-YYY", device)
    speech = tts.speak("red box seven", speaker=(waveform, rate), seed=3)   # speech.audio: (S,) at tts.sample_rate
"""

from dataclasses import dataclass

import numpy as np
import torch

from model.audio.diffusion import AudioDiT, FrameCodec, generate_mel
from model.audio.speaker_encoders import speaker_encoder_from_description
from model.audio.vae import AudioVAE
from model.pretrained import load_diffusion_checkpoint, load_pretrained
from model.text_encoders import text_encoder_from_description

FEATURE_KEYS = ("sample_rate", "n_mels", "n_fft", "hop_length", "win_length", "f_min", "f_max")


def load_audio_vae_checkpoint(directory, device: torch.device | str = "cpu") -> AudioVAE:
    """The eval-mode, frozen float32 VAE of a pretrain_audio_vae.py checkpoint (config.yaml, model.safetensors)."""
    return load_pretrained(directory, device, family="audio_vae").requires_grad_(False)


def load_audio_diffusion_checkpoint(checkpoint, use_ema: bool = True,
                                    device: torch.device | str = "cpu") -> tuple[AudioDiT, dict]:
    """The eval-mode DiT of a pretrain_audio_diffusion.py checkpoint (its EMA weights, or the trained ones) and the
    checkpoint's diffusion_meta.json (representation, normalisation, VAE, encoders, frames per text token)."""
    return load_diffusion_checkpoint(checkpoint, "audio_diffusion", use_ema, device)


@dataclass
class Speech:
    """What TextToSpeech.speak made: audio (S,) float32 in [-1, 1], mel (1, n_mels, T) the generated log-mel, and
    frames = T."""

    audio: np.ndarray
    mel: torch.Tensor
    frames: int


class TextToSpeech:
    """A pretrain_audio_diffusion.py checkpoint ready to speak: the DiT (EMA weights unless use_ema=False), the vocoder
    of vocoder_checkpoint (refused when its mel features differ from the run's), and the text encoder, speaker encoder
    and (for a latent run) audio VAE the run recorded in diffusion_meta.json (vae_checkpoint: the VAE if it has
    moved)."""

    def __init__(self, checkpoint, vocoder_checkpoint, device: torch.device, use_ema: bool = True,
                 vae_checkpoint=None):
        self.model, self.meta = load_audio_diffusion_checkpoint(checkpoint, use_ema=use_ema, device=device)
        self.device, self.features = device, self.meta["features"]
        self.vocoder = load_pretrained(vocoder_checkpoint, device, family="vocoder")
        differ = [key for key in FEATURE_KEYS if self.vocoder.features.to_dict()[key] != self.features[key]]
        if differ:
            raise ValueError(f"the vocoder {vocoder_checkpoint} takes other mel features than the run was trained on "
                             f"({', '.join(differ)} differ): pass a vocoder trained on the run's features")
        vae = None
        if self.meta["representation"] == "latent":
            vae = load_audio_vae_checkpoint(vae_checkpoint or self.meta["vae_checkpoint"], device)
        self.codec = FrameCodec(self.meta["representation"], self.meta["mel_mean"], self.meta["mel_std"], vae,
                                self.meta["latent_scale"])
        self.text_encoder = text_encoder_from_description(self.meta["text_encoder"], device)
        self.speaker_encoder = speaker_encoder_from_description(self.meta["speaker_encoder"], device) \
            if self.needs_speaker else None

    @property
    def sample_rate(self) -> int:
        return self.features["sample_rate"]

    @property
    def needs_speaker(self) -> bool:
        """Whether the run is conditioned on a speaker: speak() then needs a recording of the voice."""
        return bool(self.model.config.speaker_embedding_dim)

    @torch.no_grad()
    def speak(self, prompt: str, speaker: tuple[torch.Tensor, int] | None = None, seconds: float | None = None,
              steps: int | None = None, seed: int = 0, guidance_scale: float | None = None,
              speaker_guidance_scale: float | None = None) -> Speech:
        """Speech of prompt in the voice of speaker (a recording: mono waveform (S,) and its sample rate; needed by a
        speaker-conditioned run, ignored by others), seconds long (default: the prompt's text tokens times the mel
        frames per token of the training data). The same seed gives the same speech; steps and the guidance scales
        default to the config's."""
        embedding = None
        if self.needs_speaker:
            if speaker is None:
                raise ValueError(f"this run is conditioned on a speaker: pass --speaker ref.wav (a recording of the "
                                 f"voice, embedded by {self.meta['speaker_encoder']['name']})")
            embedding = self.speaker_encoder.embed([speaker[0]], speaker[1])
        text_emb, text_mask = self.text_encoder.encode([prompt])
        if seconds is not None:
            frames = 1 + round(seconds * self.sample_rate) // self.features["hop_length"]
        else:
            frames = max(2, round(int(text_mask.sum()) * self.meta["frames_per_text_token"]))
        mel = generate_mel(self.model, self.codec, text_emb, embedding, frames, steps, seed, guidance_scale,
                           speaker_guidance_scale)
        audio = self.vocoder(mel.to(self.device))[0][0].float().clamp(-1, 1).cpu().numpy()
        return Speech(audio, mel, frames)
