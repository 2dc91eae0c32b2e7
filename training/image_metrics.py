"""Image reconstruction metrics: PSNR and SSIM (Wang, Bovik, Sheikh & Simoncelli 2004), per image, in float32.

    psnr(reference, distorted)          # reference, distorted: (B, C, H, W) in [0, data_range] -> (B,) dB
    ssim(reference, distorted)          # -> (B,) in [-1, 1]

SSIM follows the paper: an 11-tap Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, local statistics without
the sample-covariance correction, the SSIM map kept where the window fits inside the image ("valid"), averaged
over the map and the channels (as skimage's structural_similarity with gaussian_weights=True,
use_sample_covariance=False).
"""

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(reference: torch.Tensor, distorted: torch.Tensor) -> None:
    if reference.dim() != 4 or reference.shape != distorted.shape:
        raise ValueError(f"images must both be (B, C, H, W) of one shape, got {tuple(reference.shape)} and "
                         f"{tuple(distorted.shape)}")


def psnr(reference: torch.Tensor, distorted: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """10 log10(data_range^2 / MSE) per image: (B, C, H, W) x 2 -> (B,); +inf for identical images."""
    _check_pair(reference, distorted)
    mse = (reference.float() - distorted.float()).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, device=None) -> torch.Tensor:
    """The normalised 1-D Gaussian: (size,) float32."""
    offsets = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    weights = torch.exp(-offsets.square() / (2 * sigma ** 2))
    return weights / weights.sum()


def _local_mean(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of each channel, valid part only: (N, C, H, W) -> (N, C, H - k + 1, W - k + 1)."""
    channels = x.shape[1]
    rows = window.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    columns = window.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    return F.conv2d(F.conv2d(x, rows, groups=channels), columns, groups=channels)


def ssim(reference: torch.Tensor, distorted: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM per image: (B, C, H, W) x 2 -> (B,). H and W must be at least 11 (the window)."""
    _check_pair(reference, distorted)
    if min(reference.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got "
                         f"{tuple(reference.shape[-2:])}")
    x, y = reference.float(), distorted.float()
    window = gaussian_window(device=x.device)
    mu_x, mu_y = _local_mean(x, window), _local_mean(y, window)
    var_x = _local_mean(x * x, window) - mu_x.square()
    var_y = _local_mean(y * y, window) - mu_y.square()
    covariance = _local_mean(x * y, window) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * covariance + c2)) / \
               ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)
