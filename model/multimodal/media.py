"""Media spans: how each kind of media enters the sequence (an encoder) and leaves it (a decoder).

A span of kind K holds its VAE latents as `num_positions(entry)` consecutive positions between K's begin and end
tokens. The encoder turns noisy latents and their diffusion timestep into those positions' embeddings; the decoder
turns the backbone's final hidden states at those positions into the diffusion model's prediction (the latents'
shape). A modality is one entry of MEDIA_KINDS: a settings check and an encoder/decoder pair. An encoder is called
as encoder(latents, timesteps, condition): condition is the span's conditioning vector (M, D) (a speaker
embedding for audio) or None for kinds that take none.

Image entry (config.media["image"]): latent_channels, latent_height, latent_width (the image VAE's latent grid),
patch_size (latent pixels per patch side) and optionally attention: "bidirectional" (default: the patches of one
image see each other, as in Transfusion) or "causal" (each patch sees only earlier ones: Transfusion's ablation). Patches are embedded by a linear map of the flattened patch (ViT /
Transfusion's linear patchification) plus the timestep embedding and the fixed 2-D sin-cos position of the
patch's grid cell (DiT's), so the backbone's own 1-D sequence positions need not encode the grid.

Audio entry (config.media["audio"]): channels and frames of one clip's frame sequence (the audio VAE's latents with
their frequency rows stacked into channels, or normalised log-mel bands: model/audio/diffusion.py's FrameCodec),
patch_frames (frames per position), optionally attention ("bidirectional" by default, or "causal" for streaming)
and speaker_embedding_dim (default 0: no speaker; otherwise the speaker encoder's width: every span then needs the
clip's speaker embedding, added to each of its positions through a linear map). Frames are embedded by a linear
map of the flattened patch plus the timestep embedding and the fixed 1-D sinusoidal position of the patch along
time. Clips are padded with silence to `frames` (preprocess_multimodal_dataset.py), so every span has one length.
"""

import torch
from torch import nn

from model.diffusion.dit import TIMESTEP_FREQUENCIES, sincos_2d, timestep_embedding

IMAGE_KEYS = ("latent_channels", "latent_height", "latent_width", "patch_size")
AUDIO_KEYS = ("channels", "frames", "patch_frames")
AUDIO_OPTIONAL_KEYS = ("attention", "speaker_embedding_dim")
ATTENTION = ("bidirectional", "causal")


def _check_attention(kind: str, entry: dict) -> None:
    if entry.get("attention", ATTENTION[0]) not in ATTENTION:
        raise ValueError(f"config media '{kind}' key 'attention' must be one of {', '.join(ATTENTION)}, got "
                         f"{entry['attention']!r}")


def _is_count(value, minimum: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def time_embedder(hidden_size: int) -> nn.Module:
    """The diffusion timestep's embedding: sinusoidal features (M, TIMESTEP_FREQUENCIES) → (M, hidden)."""
    return nn.Sequential(nn.Linear(TIMESTEP_FREQUENCIES, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))


def _refuse_condition(kind: str, condition) -> None:
    if condition is not None:
        raise ValueError(f"'{kind}' spans take no conditioning vector, but one was given")


def check_image_entry(entry: dict, hidden_size: int) -> None:
    """ValueError unless `entry` holds IMAGE_KEYS as positive integers with the patch dividing the grid, and
    optionally a valid attention."""
    if not isinstance(entry, dict) or sorted(set(entry) - {"attention"}) != sorted(IMAGE_KEYS):
        raise ValueError(f"config media 'image' must be a mapping with the keys {', '.join(IMAGE_KEYS)} (and "
                         f"optionally attention), got {entry!r}")
    _check_attention("image", entry)
    for key in IMAGE_KEYS:
        value = entry[key]
        if not _is_count(value):
            raise ValueError(f"config media 'image' key '{key}' must be a positive integer, got {value!r}")
    if entry["latent_height"] % entry["patch_size"] or entry["latent_width"] % entry["patch_size"]:
        raise ValueError(f"config media 'image': patch_size={entry['patch_size']} must divide the latent grid "
                         f"{entry['latent_height']}x{entry['latent_width']}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by 4 for the 2-D position embedding of images")


def image_grid(entry: dict) -> tuple[int, int]:
    """(rows, columns) of patches of one image."""
    return entry["latent_height"] // entry["patch_size"], entry["latent_width"] // entry["patch_size"]


class ImagePatchEncoder(nn.Module):
    """latents: (M, C, h, w), timesteps: (M,) on the 0..num_train_timesteps scale, condition: None → (M, N, hidden),
    N = patches, row-major."""

    def __init__(self, entry: dict, hidden_size: int):
        super().__init__()
        self.channels, self.patch = entry["latent_channels"], entry["patch_size"]
        self.grid = image_grid(entry)
        self.shape = (entry["latent_channels"], entry["latent_height"], entry["latent_width"])
        self.patch_proj = nn.Linear(self.channels * self.patch ** 2, hidden_size)
        self.time_embed = time_embedder(hidden_size)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, condition=None) -> torch.Tensor:
        _refuse_condition("image", condition)
        if tuple(latents.shape[1:]) != self.shape:
            raise ValueError(f"image latents must be (M, {', '.join(map(str, self.shape))}) as the config's media "
                             f"entry says, got {tuple(latents.shape)}: was the cache written with another VAE?")
        M, C, _, _ = latents.shape
        (rows, columns), p = self.grid, self.patch
        dtype = self.patch_proj.weight.dtype
        patches = latents.to(dtype).reshape(M, C, rows, p, columns, p).permute(0, 2, 4, 1, 3, 5)
        x = self.patch_proj(patches.reshape(M, rows * columns, C * p * p))
        time = self.time_embed(timestep_embedding(timesteps, TIMESTEP_FREQUENCIES).to(dtype))
        return x + time[:, None] + sincos_2d(rows, columns, x.shape[-1], x.device, dtype)[None]


class ImagePatchDecoder(nn.Module):
    """hidden: (M, N, hidden) → prediction (M, C, h, w). Starts at zero (as DiT's final layer), so an untrained
    model predicts zeros."""

    def __init__(self, entry: dict, hidden_size: int):
        super().__init__()
        self.channels, self.patch = entry["latent_channels"], entry["patch_size"]
        self.grid = image_grid(entry)
        self.proj = nn.Linear(hidden_size, self.channels * self.patch ** 2)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        M = hidden.shape[0]
        (rows, columns), p, C = self.grid, self.patch, self.channels
        patches = self.proj(hidden).reshape(M, rows, columns, C, p, p).permute(0, 3, 1, 4, 2, 5)
        return patches.reshape(M, C, rows * p, columns * p)


def check_audio_entry(entry: dict, hidden_size: int) -> None:
    """ValueError unless `entry` holds AUDIO_KEYS as positive integers with patch_frames dividing frames, and
    optionally a valid attention and a non-negative speaker_embedding_dim."""
    if not isinstance(entry, dict) or sorted(set(entry) - set(AUDIO_OPTIONAL_KEYS)) != sorted(AUDIO_KEYS):
        raise ValueError(f"config media 'audio' must be a mapping with the keys {', '.join(AUDIO_KEYS)} (and "
                         f"optionally {', '.join(AUDIO_OPTIONAL_KEYS)}), got {entry!r}")
    _check_attention("audio", entry)
    for key in AUDIO_KEYS:
        if not _is_count(entry[key]):
            raise ValueError(f"config media 'audio' key '{key}' must be a positive integer, got {entry[key]!r}")
    if not _is_count(entry.get("speaker_embedding_dim", 0), minimum=0):
        raise ValueError("config media 'audio' key 'speaker_embedding_dim' must be a non-negative integer (0: no "
                         f"speaker), got {entry['speaker_embedding_dim']!r}")
    if entry["frames"] % entry["patch_frames"]:
        raise ValueError(f"config media 'audio': patch_frames={entry['patch_frames']} must divide "
                         f"frames={entry['frames']}")
    if hidden_size % 2:
        raise ValueError(f"hidden_size={hidden_size} must be even for the 1-D position embedding of audio")


def audio_positions(entry: dict) -> int:
    """Positions (patches along time) of one clip."""
    return entry["frames"] // entry["patch_frames"]


class AudioFrameEncoder(nn.Module):
    """latents: (M, channels, frames), timesteps: (M,) on the 0..num_train_timesteps scale, condition: the clips'
    speaker embeddings (M, speaker_embedding_dim), or None when the entry has none → (M, N, hidden), N = frames /
    patch_frames, in time order."""

    def __init__(self, entry: dict, hidden_size: int):
        super().__init__()
        self.shape, self.patch = (entry["channels"], entry["frames"]), entry["patch_frames"]
        self.speaker_dim = entry.get("speaker_embedding_dim", 0)
        self.frame_proj = nn.Linear(entry["channels"] * self.patch, hidden_size)
        self.time_embed = time_embedder(hidden_size)
        self.speaker_proj = nn.Linear(self.speaker_dim, hidden_size) if self.speaker_dim else None

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, condition=None) -> torch.Tensor:
        if tuple(latents.shape[1:]) != self.shape:
            raise ValueError(f"audio frames must be (M, {', '.join(map(str, self.shape))}) as the config's media "
                             f"entry says, got {tuple(latents.shape)}: was the cache written with another audio "
                             "VAE or clip length?")
        M, C, T = latents.shape
        dtype = self.frame_proj.weight.dtype
        patches = latents.to(dtype).reshape(M, C, T // self.patch, self.patch).transpose(1, 2)
        x = self.frame_proj(patches.reshape(M, T // self.patch, C * self.patch))
        time = self.time_embed(timestep_embedding(timesteps, TIMESTEP_FREQUENCIES).to(dtype))
        positions = timestep_embedding(torch.arange(x.shape[1], device=x.device), x.shape[-1]).to(dtype)
        x = x + time[:, None] + positions[None]
        if self.speaker_proj is None:
            _refuse_condition("audio (speaker_embedding_dim 0)", condition)
            return x
        if condition is None or tuple(condition.shape) != (M, self.speaker_dim):
            got = None if condition is None else tuple(condition.shape)
            raise ValueError(f"audio spans need their speaker embeddings ({M}, {self.speaker_dim}) (the entry's "
                             f"speaker_embedding_dim), got {got}: embed the clip's speaker with the cache's encoder")
        return x + self.speaker_proj(condition.to(dtype))[:, None]


class AudioFrameDecoder(nn.Module):
    """hidden: (M, N, hidden) → prediction (M, channels, frames). Starts at zero, as the image decoder."""

    def __init__(self, entry: dict, hidden_size: int):
        super().__init__()
        self.channels, self.patch = entry["channels"], entry["patch_frames"]
        self.proj = nn.Linear(hidden_size, self.channels * self.patch)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        M, N, _ = hidden.shape
        patches = self.proj(hidden).reshape(M, N, self.channels, self.patch).transpose(1, 2)
        return patches.reshape(M, self.channels, N * self.patch)


# kind -> (settings check, positions per span, encoder, decoder); the order fixes the begin/end token ids
MEDIA_KINDS = {
    "image": (check_image_entry, lambda entry: image_grid(entry)[0] * image_grid(entry)[1],
              ImagePatchEncoder, ImagePatchDecoder),
    "audio": (check_audio_entry, audio_positions, AudioFrameEncoder, AudioFrameDecoder),
}


def check_media_entry(kind: str, entry: dict, hidden_size: int) -> None:
    """ValueError naming the key unless `entry` is valid settings for `kind`."""
    MEDIA_KINDS[kind][0](entry, hidden_size)


def num_positions(kind: str, entry: dict) -> int:
    """Sequence positions one span of `kind` occupies between its begin and end tokens."""
    return MEDIA_KINDS[kind][1](entry)


def is_bidirectional(entry: dict) -> bool:
    """Whether the positions of one span see each other (the entry's attention, bidirectional by default)."""
    return entry.get("attention", ATTENTION[0]) == "bidirectional"


def build_media_codec(kind: str, entry: dict, hidden_size: int) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) of one media kind."""
    _, _, encoder, decoder = MEDIA_KINDS[kind]
    return encoder(entry, hidden_size), decoder(entry, hidden_size)
