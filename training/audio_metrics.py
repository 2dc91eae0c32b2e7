"""Audio reconstruction metrics of a vocoder, shared by its training evaluation (training/vocoder_task.py) and
evaluate_vocoder.py, and timed synthesis for the real-time factor (vocode.py, evaluate_vocoder.py).

    metrics = reconstruction_metrics(generated, target, config, MultiResolutionSTFTLoss(config.stft_resolutions))
    waveform, seconds = synthesize(vocoder, mel, device)      # mel (1, n_mels, T) → ((T - 1) * hop,), seconds
"""

import time

import torch

from model.audio.criteria import MultiResolutionSTFTLoss, mel_l1_loss
from model.audio.vocoders.config import VocoderConfig

WARM_UP_FRAMES = 16


def reconstruction_metrics(generated: torch.Tensor, target: torch.Tensor, config: VocoderConfig,
                           stft_loss: MultiResolutionSTFTLoss) -> dict:
    """generated, target: (B, S) → {"mel_l1": mean |log-mel difference|, "mrstft": spectral convergence + log
    magnitude distance averaged over config.stft_resolutions (stft_loss)}, float32 scalars."""
    convergence, log_magnitude = stft_loss(generated, target)
    return {"mel_l1": mel_l1_loss(generated, target, config.features), "mrstft": convergence + log_magnitude}


def min_metric_samples(config: VocoderConfig) -> int:
    """The fewest samples reconstruction_metrics can take (its widest centred STFT needs more than n_fft / 2)."""
    return max([config.n_fft] + [n_fft for n_fft, _, _ in config.stft_resolutions]) // 2 + 1


@torch.no_grad()
def synthesize(vocoder, mel: torch.Tensor, device: torch.device, warm_up: bool = True) -> tuple[torch.Tensor, float]:
    """mel (1, n_mels, T) → (waveform float32 ((T - 1) * hop,) on the CPU, seconds the synthesis took). warm_up: run
    the vocoder once on the first frames beforehand, so that first-call costs (kernels, FFT plans) do not count."""
    mel = mel.to(device)
    if warm_up:
        vocoder(mel[..., :WARM_UP_FRAMES])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    waveform, _ = vocoder(mel)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return waveform[0].float().cpu(), time.perf_counter() - started
