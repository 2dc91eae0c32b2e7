"""Log-mel spectrograms as images for TensorBoard: matplotlib's magma colormap applied to the values, low
frequencies at the bottom, several spectrograms stacked top to bottom on one colour scale.

    pixels = mel_image([reference_mel, generated_mel], floor=math.log(1e-5))   # (3, H, W) in [0, 1]
"""

import matplotlib
import torch

COLORMAP = "magma"
SEPARATOR_ROWS = 2  # white rows between stacked spectrograms


def mel_image(mels: list, floor: float) -> torch.Tensor:
    """mels: log-mel spectrograms (n_mels, T), each of the same n_mels (T may differ; shorter ones are padded at
    `floor` on the right) → pixels (3, k * n_mels + (k - 1) * SEPARATOR_ROWS, max T) float32 in [0, 1].

    Values map linearly from `floor` (the log of the features' log_floor: black) to the largest value of the
    first spectrogram (light yellow), so a generated spectrogram is shown on its reference's scale."""
    if not mels or any(mel.dim() != 2 for mel in mels) or len({mel.shape[0] for mel in mels}) != 1:
        raise ValueError(f"mel_image expects a non-empty list of (n_mels, T) spectrograms with the same n_mels, got "
                         f"shapes {[tuple(mel.shape) for mel in mels]}")
    width = max(mel.shape[1] for mel in mels)
    top = float(mels[0].detach().float().max())
    scale = max(top - floor, 1e-6)
    colormap = matplotlib.colormaps[COLORMAP]
    rows = []
    for index, mel in enumerate(mels):
        values = mel.detach().float().cpu()
        values = torch.nn.functional.pad(values, (0, width - values.shape[1]), value=floor)
        normalised = ((values - floor) / scale).clamp(0, 1).flip(0)  # row 0 = the highest mel band
        rgba = torch.from_numpy(colormap(normalised.numpy())).float()  # (n_mels, T, 4)
        if index:
            rows.append(torch.ones(SEPARATOR_ROWS, width, 3))
        rows.append(rgba[..., :3])
    return torch.cat(rows, dim=0).permute(2, 0, 1).contiguous()
