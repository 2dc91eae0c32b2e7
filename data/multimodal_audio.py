"""Audio for the interleaved cache of the world model (preprocess_multimodal_dataset.py --audio_cache_dir): the
utterances of a preprocess_audio_diffusion_dataset.py cache as fixed-length clips of frames, with their transcripts
and speaker embeddings.

    clips = AudioClips(ShardedCache(dir), representation="latent", vae=vae, mel_frames=160)
    for entry, skip in clips.entries(max_clips=2000):     # cache entries, or (None, why it was skipped)
        ...
    clips.describe()                                       # meta.json's media.audio (with every encoder used)
    codec = ClipCodec(meta["media"]["audio"], device, vocoder_checkpoint=None)   # a run's clips both ways
    frames, speaker = codec.read("in.wav")                 # a recording -> frames (scaled) and its speaker embedding
    waveform = codec.waveform(frames, speaker)             # frames -> log-mel -> (S,) float32 at codec.sample_rate,
                                                           # cut after the speech (trim_silence=False keeps the padding)

A clip's log-mel is padded on the right with silence (the log-mel floor) to `mel_frames` (longer utterances are
skipped and counted) and turned into frames by model/audio/diffusion.py's FrameCodec: the audio VAE's posterior
means with frequency rows stacked into channels (representation "latent"), or the log-mel normalised by the audio
cache's mel_mean and mel_std ("mel"). Entries hold caption (the transcript), audio_latent_mean (channels, frames)
and audio_condition (the speaker embedding the audio cache stored); the tokenizer adds caption_ids.
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from types import SimpleNamespace

import torchaudio

from data.audio_sources import AudioDecodeError, AudioRecord, decode_record
from data.image_latents import LatentStatistics, checkpoint_fingerprint
from data.sharded_cache import ShardedCache
from model.audio.diffusion import FrameCodec
from model.audio.features import AudioFeatureConfig, log_mel, speech_end
from model.audio.griffin_lim import GriffinLimVocoder
from model.audio.pipeline import load_audio_vae_checkpoint
from model.audio.speaker_encoders import speaker_encoder_from_description
from model.pretrained import load_pretrained

AUDIO_CACHE_MADE_BY = "preprocess_audio_diffusion_dataset.py"
REPRESENTATIONS = ("latent", "mel")


def open_audio_cache(directory) -> ShardedCache:
    """An utterance cache of preprocess_audio_diffusion_dataset.py (ValueError for any other cache)."""
    cache = ShardedCache(directory, made_by=AUDIO_CACHE_MADE_BY)
    if cache.meta.get("made_by") != AUDIO_CACHE_MADE_BY:
        raise ValueError(f"--audio_cache_dir {directory} is not an utterance cache (made by "
                         f"{cache.meta.get('made_by', 'an unknown script')}): write it with {AUDIO_CACHE_MADE_BY}")
    return cache


@torch.no_grad()
def encode_clip(codec: FrameCodec, mel: torch.Tensor, mel_frames: int, silence: float) -> torch.Tensor:
    """mel (n_mels, T <= mel_frames) raw log-mel, padded with `silence` → frames (channels, mel_frames / r) on the
    CPU, unscaled."""
    padded = F.pad(mel.float(), (0, mel_frames - mel.shape[-1]), value=silence)
    return codec.encode(padded[None])[0].cpu()


class AudioClips:
    """The clips of an utterance cache as frames of one length. vae: the audio VAE for "latent" (None for
    "mel"), checkpoint its directory; mel_frames: the clip length in mel frames (None: the cache's longest
    utterance); frames_multiple: the number of frames is rounded up to a multiple of this (so that a config's
    patch_frames divides it)."""

    def __init__(self, cache: ShardedCache, representation: str, vae=None, checkpoint=None,
                 mel_frames: int | None = None, frames_multiple: int = 4):
        if representation not in REPRESENTATIONS:
            raise ValueError(f"--audio_representation must be one of {', '.join(REPRESENTATIONS)}, "
                             f"got {representation!r}")
        if representation == "latent" and vae is None:
            raise ValueError("--audio_representation latent needs --audio_vae_checkpoint (a pretrain_audio_vae.py "
                             "checkpoint); --audio_representation mel needs none")
        if frames_multiple < 1 or (mel_frames is not None and mel_frames < 1):
            raise ValueError(f"--audio_frames and --audio_frames_multiple must be positive, got {mel_frames} and "
                             f"{frames_multiple}")
        meta = cache.meta
        self.cache, self.representation, self.checkpoint = cache, representation, checkpoint
        self.features = meta["features"]
        if vae is not None and vae.config.n_mels != self.features["n_mels"]:
            raise ValueError(f"the audio VAE takes {vae.config.n_mels} mel bands but {cache.directory} holds "
                             f"{self.features['n_mels']}: use a VAE trained on this cache's features")
        if vae is not None and vae.config.speaker_embedding_dim not in (0, meta["speaker_embedding_dim"]):
            raise ValueError(f"the audio VAE decodes with {vae.config.speaker_embedding_dim}-dim speaker embeddings "
                             f"but {cache.directory} holds {meta['speaker_embedding_dim']}-dim ones "
                             f"({meta['speaker_encoder']['name']}): use a VAE trained with this cache's speaker "
                             "encoder")
        self.codec = FrameCodec(representation, meta["mel_mean"], meta["mel_std"], vae)
        step = self.codec.frames_per_step * frames_multiple
        self.mel_frames = -(-(mel_frames or meta["max_frames"]) // step) * step
        self.silence = math.log(self.features.get("log_floor", 1e-5))
        self.statistics = LatentStatistics()
        self.clips = self.too_long = 0

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (n_mels, T <= mel_frames) raw log-mel → frames (channels, mel_frames / r) float32."""
        return encode_clip(self.codec, mel, self.mel_frames, self.silence)

    def entries(self, max_clips: int | None = None):
        """Yield (entry, None) per clip or (None, {"source_id", "reason"}) per utterance longer than the clip."""
        for index in range(min(len(self.cache), max_clips or len(self.cache))):
            item = self.cache[index]
            if item["frames"] > self.mel_frames:
                self.too_long += 1
                yield None, {"source_id": item["source_id"], "reason": f"{item['frames']} mel frames, longer than "
                                                                       f"--audio_frames {self.mel_frames}"}
                continue
            frames = self.encode(item["mel"])
            self.statistics.add(frames, torch.full_like(frames, -math.inf))
            self.clips += 1
            yield {"caption": item["text"], "speaker": item["speaker"], "source_id": item["source_id"],
                   "audio_latent_mean": frames, "audio_condition": item["speaker_embedding"].float()}, None

    def transcripts(self, max_clips: int | None = None) -> list[str]:
        return [self.cache[index]["text"] for index in range(min(len(self.cache), max_clips or len(self.cache)))]

    def describe(self, latent_shape: list) -> dict:
        """meta.json's media.audio: the frames, their scale and every encoder that made them."""
        mean, std = self.statistics.mean_and_std()
        vae = self.codec.vae
        meta = self.cache.meta
        return {"latent_shape": latent_shape, "latent_scale_factor": 1.0 / max(std, 1e-8), "latent_mean": mean,
                "latent_std": std, "representation": self.representation, "mel_frames": self.mel_frames,
                "frames_per_step": self.codec.frames_per_step, "features": self.features,
                "mel_mean": meta["mel_mean"], "mel_std": meta["mel_std"], "silence": self.silence,
                "vae_checkpoint": str(Path(self.checkpoint).resolve()) if vae is not None else None,
                "vae_fingerprint": checkpoint_fingerprint(self.checkpoint) if vae is not None else None,
                "vae_config": vae.config.to_dict() if vae is not None else None,
                "speaker_encoder": meta["speaker_encoder"], "speaker_embedding_dim": meta["speaker_embedding_dim"],
                "audio_cache": str(Path(self.cache.directory).resolve()),
                "counts": {"clips": self.clips, "too_long": self.too_long}}


class ClipCodec:
    """Sound to the world model's audio frames and back, with the encoders a cache or run recorded (meta.json's
    media.audio). read: a recording → its log-mel (resampled to the features' rate, mixed to mono), padded with
    silence to the clip length, encoded as the cache was and scaled, and its speaker embedding by the recorded
    speaker encoder. waveform: frames divided by the latent scale factor, decoded by the audio VAE's decoder with
    the speaker embedding (or un-normalised, for mel frames) into a log-mel, and vocoded by --vocoder_checkpoint (a
    pretrain_vocoder.py checkpoint on the same features) or, without one, by Griffin-Lim. vae_checkpoint: the audio
    VAE if it has moved (other weights are refused)."""

    def __init__(self, audio_meta: dict, device, vae_checkpoint=None, vocoder_checkpoint=None):
        self.meta, self.device = audio_meta, device
        vae = None
        if audio_meta["representation"] == "latent":
            directory = Path(vae_checkpoint or audio_meta["vae_checkpoint"])
            if not (directory / "model.safetensors").is_file():
                raise FileNotFoundError(f"the audio VAE checkpoint {directory} is gone: pass --audio_vae_checkpoint "
                                        "the same checkpoint at its new place")
            if checkpoint_fingerprint(directory) != audio_meta["vae_fingerprint"]:
                raise ValueError(f"the audio VAE {directory} is not the one the audio frames were made with "
                                 f"({audio_meta['vae_checkpoint']}): pass that checkpoint as --audio_vae_checkpoint")
            vae = load_audio_vae_checkpoint(directory, device)
        self.codec = FrameCodec(audio_meta["representation"], audio_meta["mel_mean"], audio_meta["mel_std"], vae)
        features = AudioFeatureConfig(**audio_meta["features"])
        self.features, self.sample_rate, self.speaker_encoder = features, features.sample_rate, None
        if vocoder_checkpoint:
            self.vocoder = load_pretrained(vocoder_checkpoint, device, family="vocoder")
            differ = [key for key, value in features.to_dict().items()
                      if self.vocoder.features.to_dict().get(key) != value]
            if differ:
                raise ValueError(f"the vocoder {vocoder_checkpoint} takes other mel features than the audio frames "
                                 f"({', '.join(differ)} differ): pass a vocoder trained on the same features")
        else:
            self.vocoder = GriffinLimVocoder(SimpleNamespace(features=features), n_iter=32)

    @torch.no_grad()
    def mel(self, frames: torch.Tensor, speaker: torch.Tensor | None) -> torch.Tensor:
        """frames (channels, frames) scaled as in training, speaker (D,) or None → log-mel (n_mels, mel_frames)."""
        speaker = None if speaker is None or self.codec.vae is None or not self.codec.vae.config.speaker_embedding_dim \
            else speaker.float().reshape(1, -1).to(self.device)
        unscaled = frames.float()[None].to(self.device) / self.meta["latent_scale_factor"]
        return self.codec.decode(unscaled, speaker)[0]

    @torch.no_grad()
    def waveform(self, frames: torch.Tensor, speaker: torch.Tensor | None, trim_silence: bool = True) -> torch.Tensor:
        """frames as for mel → the waveform (S,) float32 in [-1, 1] on the CPU. With trim_silence the log-mel is cut
        after its last sounding frame first (model/audio/features.speech_end): a clip is an utterance padded with
        silence, and a vocoder turns the padding's log floor into a faint noise that a recogniser hears as words."""
        mel = self.mel(frames, speaker)
        if trim_silence:
            mel = mel[:, :speech_end(mel)]
        return self.vocoder(mel[None])[0][0].float().clamp(-1, 1).cpu()

    def _load(self, path) -> torch.Tensor:
        """A recording → its waveform (S,) at the features' rate, mixed to mono (ValueError when unreadable)."""
        try:
            waveform, rate = decode_record(AudioRecord(source_id=str(path), path=str(path)))
        except AudioDecodeError as error:
            raise ValueError(f"{path}: {error}: give a wav/flac/ogg recording") from error
        if rate != self.sample_rate:
            waveform = torchaudio.functional.resample(waveform, rate, self.sample_rate)
        return waveform

    def _embed_speaker(self, waveform: torch.Tensor) -> torch.Tensor:
        if self.speaker_encoder is None:
            self.speaker_encoder = speaker_encoder_from_description(self.meta["speaker_encoder"], self.device)
        return self.speaker_encoder.embed([waveform], self.sample_rate)[0].float().to(self.device)

    def read_speaker(self, path) -> torch.Tensor:
        """A recording of a voice → its speaker embedding (D,) by the recorded speaker encoder, on the device."""
        return self._embed_speaker(self._load(path))

    def read(self, path) -> tuple[torch.Tensor, torch.Tensor]:
        """A recording → (frames (channels, frames) scaled as in training, speaker embedding (D,)), on the device.
        ValueError when it cannot be read or is longer than the clips the model takes."""
        waveform = self._load(path)
        mel = log_mel(waveform, self.features)
        limit = self.meta["mel_frames"]
        if mel.shape[-1] > limit:
            raise ValueError(f"{path} lasts {waveform.numel() / self.sample_rate:.2f} s, longer than the "
                             f"{limit * self.features.hop_length / self.sample_rate:.2f} s clips the model was trained "
                             "on: cut it")
        frames = encode_clip(self.codec, mel, limit, self.meta["silence"]) * self.meta["latent_scale_factor"]
        return frames.to(self.device), self._embed_speaker(waveform)
