"""What a run shows: TensorBoard scalars, text, audio and images under runs/RUN_NAME/, and a tqdm progress bar.
Only rank 0 writes or prints; on other ranks every method does nothing."""

import logging
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from training.distributed import is_main_process
from training.task import Audio, Image

logger = logging.getLogger(__name__)

# Dense bf16 matmul peak per GPU (NVIDIA's figures without sparsity), for MFU: the first entry whose key is part of
# the device name counts, so a variant comes before its family (the PCIe and NVL cards run at lower clocks than
# the SXM ones). None, or a GPU not listed, logs no MFU rather than a wrong one.
GPU_PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12),
                  ("H200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12),
                  ("A10G", None), ("A10", 125e12), ("L4", 121e12), ("4090", 165e12))


def peak_flops_of(gpu_name: str) -> Optional[float]:
    """The dense bf16 peak FLOP/s of the GPU that torch.cuda.get_device_name calls `gpu_name` (None if unknown)."""
    return next((flops for key, flops in GPU_PEAK_FLOPS if key in gpu_name), None)


def gpu_peak_flops(device: torch.device) -> Optional[float]:
    """peak_flops_of the CUDA device (None on a CPU)."""
    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


class RunMonitor:
    def __init__(self, run_dir: Path, max_steps: int, initial_step: int, show_progress: bool):
        self.enabled = is_main_process()
        self.writer = None
        self.progress = None
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir))
        if show_progress:
            self.progress = tqdm(total=max_steps, initial=initial_step, desc="train", dynamic_ncols=True)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer:
            self.writer.add_text(tag, text, step)

    def sample(self, tag: str, sample, step: int) -> None:
        """A str, Audio or Image (training/task.py) under its TensorBoard tab."""
        if not self.writer:
            return
        if isinstance(sample, str):
            self.writer.add_text(tag, sample, step)
        elif isinstance(sample, Audio):
            waveform = sample.waveform.detach().float().cpu().clamp(-1, 1).reshape(1, -1)
            self.writer.add_audio(tag, waveform, step, sample_rate=sample.sample_rate)
        elif isinstance(sample, Image):
            self.writer.add_image(tag, sample.pixels.detach().cpu(), step)
        else:
            raise TypeError(f"sample {tag!r} must be str, Audio or Image, got {type(sample).__name__}")

    def advance(self, steps: int, postfix: Optional[dict] = None) -> None:
        if self.progress:
            self.progress.update(steps)
            if postfix:
                self.progress.set_postfix(postfix, refresh=False)

    def message(self, text: str) -> None:
        """A line for the user: through tqdm (so the bar is not broken) or the log."""
        if not self.enabled:
            return
        if self.progress:
            self.progress.write(text)
        else:
            logger.info(text)

    def close(self) -> None:
        if self.progress:
            self.progress.close()
        if self.writer:
            self.writer.flush()
            self.writer.close()
