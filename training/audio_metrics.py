"""Audio reconstruction metrics of a vocoder, shared by its training evaluation (training/vocoder_task.py) and
evaluate_vocoder.py, and timed synthesis for the real-time factor (vocode.py, evaluate_vocoder.py).

    metrics = reconstruction_metrics(generated, target, config, MultiResolutionSTFTLoss(config.stft_resolutions))
    waveform, seconds = synthesize(vocoder, mel, device)      # mel (1, n_mels, T) → ((T - 1) * hop,), seconds
    pesq_wideband(reference, degraded, sample_rate), stoi_score(...)   # (S,) each; MetricSkipped when undefined
"""

import time
import warnings

import numpy as np
import pesq
import pystoi
import torch
import torchaudio

from model.audio.criteria import MultiResolutionSTFTLoss, mel_l1_loss
from model.audio.vocoders.config import VocoderConfig

PESQ_RATE = 16000  # wideband PESQ (ITU-T P.862.2) is defined at 16 kHz

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


class MetricSkipped(Exception):
    """A metric that cannot be computed for a clip; the message says why."""


def _check_not_silent(reference: torch.Tensor, metric: str) -> None:
    if not bool(reference.abs().max() > 0):
        raise MetricSkipped(f"{metric}: silent reference clip")


def pesq_wideband(reference: torch.Tensor, degraded: torch.Tensor, sample_rate: int) -> float:
    """Wideband PESQ of degraded against reference, both (S,) at sample_rate (resampled to 16 kHz when it
    differs). MetricSkipped when PESQ rejects the clip (no utterance found, too short)."""
    _check_not_silent(reference, "pesq")
    if sample_rate != PESQ_RATE:
        reference, degraded = (torchaudio.functional.resample(x, sample_rate, PESQ_RATE) for x in (reference, degraded))
    try:
        return float(pesq.pesq(PESQ_RATE, reference.numpy().astype(np.float32), degraded.numpy().astype(np.float32),
                               "wb"))
    except pesq.PesqError as error:
        raise MetricSkipped(f"pesq: {type(error).__name__}") from error


def stoi_score(reference: torch.Tensor, degraded: torch.Tensor, sample_rate: int) -> float:
    """STOI of degraded against reference, both (S,) at sample_rate (pystoi resamples to 10 kHz itself).
    MetricSkipped when fewer than 30 frames of speech remain after pystoi drops the silent ones."""
    _check_not_silent(reference, "stoi")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = pystoi.stoi(reference.numpy().astype(np.float64), degraded.numpy().astype(np.float64), sample_rate)
    if any("Not enough STFT frames" in str(warning.message) for warning in caught):
        raise MetricSkipped("stoi: fewer than 30 frames of speech")
    return float(value)
