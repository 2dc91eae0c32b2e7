"""Pretrained speaker encoders: one embedding per utterance, for speaker-conditioned audio models and for judging them.

    encoder = load_speaker_encoder("resemblyzer", device)        # offline: weights ship inside the pip wheel
    encoder = load_speaker_encoder("speechbrain/spkrec-ecapa-voxceleb", device)   # or a local directory
    embeddings = encoder.embed([waveform_a, waveform_b], sample_rate=22050)       # (B, encoder.dim) float32
    description = encoder.describe()                             # {"name", "dim", "sample_rate"}: kept in caches
    same = speaker_encoder_from_description(description, device)

- `resemblyzer`: Resemblyzer's VoiceEncoder (Wan et al. 2018's GE2E d-vector: a 3-layer LSTM over 40-band mel
  frames, 256-dim, L2-normalised), with the weights of its pip wheel (`pretrained.pt`, read without importing the
  package, whose import pulls librosa and numba). Its inference is Resemblyzer's `embed_utterance`: the waveform
  at 16 kHz, its level raised to -30 dBFS if quieter, 1.6 s partial windows at 1.3 per second, the L2-normalised
  mean of their embeddings. The mel frames are torchaudio's (the same parameters as Resemblyzer's librosa call:
  power mel, n_fft 400, hop 160, Slaney scale and norm, zero padding); tests/test_speaker_encoders.py checks
  embeddings against Resemblyzer itself. Resemblyzer's voice-activity trimming of long silences is left out:
  our utterances are single sentences with short pauses.
- SpeechBrain's ECAPA-TDNN (`speechbrain/spkrec-ecapa-voxceleb`, 192-dim) by hub name or local directory (a
  folder holding hyperparams.yaml and the files it names, as the hub repository does), run as SpeechBrain's
  EncoderClassifier.encode_batch on 16 kHz audio. Offline, a hub name fails at once with a message naming the
  local-directory form and `resemblyzer`.
"""

import importlib.util
import logging
import tempfile
from pathlib import Path

import torch
import torchaudio
from torch import nn

logger = logging.getLogger(__name__)

RESEMBLYZER = "resemblyzer"
DEFAULT_SPEAKER_ENCODER = "speechbrain/spkrec-ecapa-voxceleb"
ENCODER_SAMPLE_RATE = 16000  # both encoders take 16 kHz audio
OFFLINE_HELP = (f"with no hub access pass --speaker_encoder a local directory holding an ECAPA model "
                f"(hyperparams.yaml and its checkpoint files, as in the hub repository), or --speaker_encoder "
                f"{RESEMBLYZER} (its weights ship inside the pip package: pip install resemblyzer)")


def _resample(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """waveform (S,) at sample_rate -> float32 (S',) at 16 kHz."""
    waveform = waveform.detach().float().flatten()
    if sample_rate != ENCODER_SAMPLE_RATE:
        waveform = torchaudio.functional.resample(waveform, sample_rate, ENCODER_SAMPLE_RATE)
    return waveform


class _VoiceNetwork(nn.Module):
    """Resemblyzer's VoiceEncoder network: mel frames (B, 160, 40) -> L2-normalised embeddings (B, 256)."""

    def __init__(self, mel_bands: int = 40, hidden: int = 256, layers: int = 3, dim: int = 256):
        super().__init__()
        self.lstm = nn.LSTM(mel_bands, hidden, layers, batch_first=True)
        self.linear = nn.Linear(hidden, dim)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        embeddings = torch.relu(self.linear(hidden[-1]))
        return embeddings / embeddings.norm(dim=1, keepdim=True).clamp(min=1e-12)


class ResemblyzerEncoder:
    """Resemblyzer's VoiceEncoder with its wheel's weights (see the module docstring). dim 256."""

    name, dim, sample_rate = RESEMBLYZER, 256, ENCODER_SAMPLE_RATE
    PARTIAL_FRAMES, HOP, RATE, MIN_COVERAGE, TARGET_DBFS = 160, 160, 1.3, 0.75, -30.0

    def __init__(self, device: torch.device | str = "cpu"):
        spec = importlib.util.find_spec("resemblyzer")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"speaker encoder {RESEMBLYZER} needs the resemblyzer package: pip install resemblyzer "
                             "(its weights ship inside it)")
        weights = Path(list(spec.submodule_search_locations)[0]) / "pretrained.pt"
        state = torch.load(weights, map_location="cpu", weights_only=True)["model_state"]
        self.device = torch.device(device)
        self.network = _VoiceNetwork()
        self.network.load_state_dict({key: value for key, value in state.items() if not key.startswith("similarity")})
        self.network.to(self.device).eval().requires_grad_(False)
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=ENCODER_SAMPLE_RATE, n_fft=400, hop_length=self.HOP, n_mels=40, pad_mode="constant",
            norm="slaney", mel_scale="slaney", power=2.0).to(self.device)

    def _partial_starts(self, samples: int) -> list[int]:
        """First mel frame of each partial window (Resemblyzer's compute_partial_slices)."""
        frames = -(-(samples + 1) // self.HOP)
        step = round(ENCODER_SAMPLE_RATE / self.RATE / self.HOP)
        starts = list(range(0, max(1, frames - self.PARTIAL_FRAMES + step + 1), step))
        coverage = (samples - starts[-1] * self.HOP) / (self.PARTIAL_FRAMES * self.HOP)
        if coverage < self.MIN_COVERAGE and len(starts) > 1:
            starts = starts[:-1]
        return starts

    @torch.no_grad()
    def embed_one(self, waveform: torch.Tensor) -> torch.Tensor:
        """waveform (S,) float at 16 kHz -> (256,) float32, unit norm."""
        waveform = waveform.to(self.device, torch.float32)
        rms = waveform.square().mean().sqrt().clamp(min=1e-10)
        gain = 10 ** ((self.TARGET_DBFS - 20 * torch.log10(rms)) / 20)
        waveform = waveform * gain.clamp(min=1.0)  # raise quiet audio to -30 dBFS, never lower it
        starts = self._partial_starts(waveform.numel())
        needed = (starts[-1] + self.PARTIAL_FRAMES) * self.HOP
        waveform = nn.functional.pad(waveform, (0, max(0, needed - waveform.numel())))
        mel = self.mel(waveform).T  # (frames, 40)
        partials = torch.stack([mel[start:start + self.PARTIAL_FRAMES] for start in starts])
        mean = self.network(partials).mean(dim=0)
        return (mean / mean.norm().clamp(min=1e-12)).float()

    def embed(self, waveforms: list[torch.Tensor], sample_rate: int) -> torch.Tensor:
        """waveforms: B tensors (S_i,) at sample_rate -> (B, 256) float32 on the encoder's device."""
        return torch.stack([self.embed_one(_resample(waveform, sample_rate)) for waveform in waveforms])

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "sample_rate": self.sample_rate}


class EcapaEncoder:
    """SpeechBrain's EncoderClassifier (ECAPA-TDNN) by hub name or local directory; dim from the model."""

    sample_rate = ENCODER_SAMPLE_RATE

    def __init__(self, name_or_path: str, device: torch.device | str = "cpu"):
        try:
            from speechbrain.inference.classifiers import EncoderClassifier
        except ImportError as error:
            raise ValueError(f"speaker encoder {name_or_path} needs speechbrain (pip install speechbrain); or use "
                             f"--speaker_encoder {RESEMBLYZER}") from error
        local = Path(name_or_path).expanduser()
        if local.is_dir():
            name_or_path = str(local.resolve())
            if not (local / "hyperparams.yaml").is_file():
                raise FileNotFoundError(f"speaker encoder directory {local} has no hyperparams.yaml; {OFFLINE_HELP}")
        elif name_or_path.startswith((".", "/", "~")) or local.exists():
            raise FileNotFoundError(f"speaker encoder {name_or_path}: no such directory; {OFFLINE_HELP}")
        else:
            _check_hub_reachable(name_or_path)
        self.device = torch.device(device)
        self._scratch = tempfile.TemporaryDirectory(prefix="speechbrain-")  # SpeechBrain links the files here
        try:
            self.model = EncoderClassifier.from_hparams(source=name_or_path, savedir=self._scratch.name,
                                                        run_opts={"device": str(self.device)})
        except Exception as error:  # a hub failure surfaces as many types (OSError, HTTP errors, ValueError...)
            raise ValueError(f"could not load the speaker encoder {name_or_path!r} ({type(error).__name__}: "
                             f"{' '.join(str(error).split())[:300]}); {OFFLINE_HELP}") from error
        if self.model is None:
            raise ValueError(f"could not load the speaker encoder {name_or_path!r}; {OFFLINE_HELP}")
        self.model.eval()
        self.name = name_or_path
        self.dim = int(self.embed([torch.zeros(ENCODER_SAMPLE_RATE)], ENCODER_SAMPLE_RATE).shape[-1])

    @torch.no_grad()
    def embed(self, waveforms: list[torch.Tensor], sample_rate: int) -> torch.Tensor:
        """waveforms: B tensors (S_i,) at sample_rate -> (B, dim) float32 (zero-padded batch with relative lengths,
        as EncoderClassifier.encode_batch takes them)."""
        resampled = [_resample(waveform, sample_rate) for waveform in waveforms]
        longest = max(waveform.numel() for waveform in resampled)
        batch = torch.stack([nn.functional.pad(waveform, (0, longest - waveform.numel())) for waveform in resampled])
        lengths = torch.tensor([waveform.numel() / longest for waveform in resampled])
        embeddings = self.model.encode_batch(batch.to(self.device), lengths.to(self.device))
        return embeddings.reshape(len(waveforms), -1).float()

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "sample_rate": self.sample_rate}


def _check_hub_reachable(repo_id: str) -> None:
    """ValueError at once when `repo_id` is neither in the local Hugging Face cache nor reachable (SpeechBrain's
    own download retries for about 25 s before it gives up)."""
    import huggingface_hub

    if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "hyperparams.yaml"), str):
        return
    try:
        huggingface_hub.model_info(repo_id, timeout=10)
    except Exception as error:  # no network, an unknown repository, a refused token: all end the same way
        raise ValueError(f"could not reach the speaker encoder {repo_id!r} on the Hugging Face hub "
                         f"({type(error).__name__}: {' '.join(str(error).split())[:200]}); {OFFLINE_HELP}") from error


def load_speaker_encoder(spec: str = DEFAULT_SPEAKER_ENCODER,
                         device: torch.device | str = "cpu") -> "ResemblyzerEncoder | EcapaEncoder":
    """`resemblyzer`, or an ECAPA model by hub name or local directory (ValueError / FileNotFoundError naming
    the offline alternatives when it cannot be loaded)."""
    if not spec:
        raise ValueError(f"no speaker encoder given: pass --speaker_encoder ({DEFAULT_SPEAKER_ENCODER}, a local "
                         f"directory, or {RESEMBLYZER})")
    encoder = ResemblyzerEncoder(device) if spec == RESEMBLYZER else EcapaEncoder(spec, device)
    logger.info("loaded speaker encoder %s (dim %d)", encoder.name, encoder.dim)
    return encoder


def speaker_encoder_from_description(description: dict, device: torch.device | str = "cpu"):
    """The encoder a describe() dict names (as recorded in a cache or run), checked to have the same width."""
    try:
        name, dim = description["name"], description["dim"]
    except (KeyError, TypeError) as error:
        raise ValueError(f"not a speaker encoder description (needs name and dim): {description!r}") from error
    encoder = load_speaker_encoder(name, device)
    if encoder.dim != dim:
        raise ValueError(f"speaker encoder {name} now gives {encoder.dim}-dim embeddings but {dim} were recorded: "
                         "point it at the encoder the cache was written with")
    return encoder
