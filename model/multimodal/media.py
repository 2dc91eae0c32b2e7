"""Media spans: how each kind of media enters the sequence (an encoder) and leaves it (a decoder).

A span of kind K holds its VAE latents as `num_positions(entry)` consecutive positions between K's begin and end
tokens. The encoder turns noisy latents and their diffusion timestep into those positions' embeddings; the decoder
turns the backbone's final hidden states at those positions into the diffusion model's prediction (the latents'
shape). A new modality (audio: latents (C, T) as frames along time, 1-D positions) is one more entry of
MEDIA_KINDS: a settings check and an encoder/decoder pair.

Image entry (config.media["image"]): latent_channels, latent_height, latent_width (the image VAE's latent grid),
patch_size (latent pixels per patch side) and optionally attention: "bidirectional" (default: the patches of one
image see each other, as in Transfusion) or "causal" (each patch sees only earlier ones: Transfusion's ablation). Patches are embedded by a linear map of the flattened patch (ViT /
Transfusion's linear patchification) plus the timestep embedding and the fixed 2-D sin-cos position of the
patch's grid cell (DiT's), so the backbone's own 1-D sequence positions need not encode the grid.
"""

import torch
from torch import nn

from model.diffusion.dit import TIMESTEP_FREQUENCIES, sincos_2d, timestep_embedding

IMAGE_KEYS = ("latent_channels", "latent_height", "latent_width", "patch_size")
ATTENTION = ("bidirectional", "causal")


def check_image_entry(entry: dict, hidden_size: int) -> None:
    """ValueError unless `entry` holds IMAGE_KEYS as positive integers with the patch dividing the grid, and
    optionally a valid attention."""
    if not isinstance(entry, dict) or sorted(set(entry) - {"attention"}) != sorted(IMAGE_KEYS):
        raise ValueError(f"config media 'image' must be a mapping with the keys {', '.join(IMAGE_KEYS)} (and "
                         f"optionally attention), got {entry!r}")
    if entry.get("attention", ATTENTION[0]) not in ATTENTION:
        raise ValueError(f"config media 'image' key 'attention' must be one of {', '.join(ATTENTION)}, got "
                         f"{entry['attention']!r}")
    for key in IMAGE_KEYS:
        value = entry[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
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
    """latents: (M, C, h, w), timesteps: (M,) on the 0..num_train_timesteps scale → (M, N, hidden), N = patches,
    row-major."""

    def __init__(self, entry: dict, hidden_size: int):
        super().__init__()
        self.channels, self.patch = entry["latent_channels"], entry["patch_size"]
        self.grid = image_grid(entry)
        self.shape = (entry["latent_channels"], entry["latent_height"], entry["latent_width"])
        self.patch_proj = nn.Linear(self.channels * self.patch ** 2, hidden_size)
        self.time_embed = nn.Sequential(nn.Linear(TIMESTEP_FREQUENCIES, hidden_size), nn.SiLU(),
                                        nn.Linear(hidden_size, hidden_size))

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
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


# kind -> (settings check, positions per span, encoder, decoder); the order fixes the begin/end token ids
MEDIA_KINDS = {
    "image": (check_image_entry, lambda entry: image_grid(entry)[0] * image_grid(entry)[1],
              ImagePatchEncoder, ImagePatchDecoder),
}


def check_media_entry(kind: str, entry: dict, hidden_size: int) -> None:
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
