"""Whether bfloat16 is fast on the training device, and the one warning when a user asks for it where it is not;
TF32 for the float32 matmuls of a GPU run.

On a CUDA GPU from Ampere on, and on CPUs with AMX or AVX-512 BF16 instructions, bfloat16 matmuls run natively.
Other CPUs (an AMD EPYC before Zen 4, an Intel Xeon without AMX) emulate them: measured on a 2-core AMD EPYC
without AVX-512, a training step of `tiny` took 8.6x as long in bfloat16 as in float32 (bench/RESULTS.md).
"""

import functools
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

NATIVE_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})  # as /proc/cpuinfo names them


@functools.lru_cache(maxsize=1)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags of the first CPU in `cpuinfo` (empty where there is no such file)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_native_bf16(device: torch.device) -> bool:
    """True where bfloat16 matmuls run in hardware on `device`; False where they are emulated (or unknown)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(cpu_flags() & NATIVE_BF16_CPU_FLAGS)
    return False


def warn_if_bf16_is_emulated(bf16: bool, device: torch.device) -> bool:
    """Log one warning (return True) when `bf16` is asked for on a device that emulates it."""
    if not bf16 or has_native_bf16(device):
        return False
    logger.warning("--bf16 on this %s: it has no native bfloat16 matmuls (no AMX / AVX-512 BF16), so they are "
                   "emulated and training runs several times slower than in float32 (8.6x measured on a 2-core "
                   "AMD EPYC). Drop --bf16 here; keep it for GPUs.", "GPU" if device.type == "cuda" else "CPU")
    return True


def fast_precision_flags(device: torch.device | None = None) -> list[str]:
    """The precision flags that are fastest on `device` (default: the GPU when there is one, else the CPU):
    ['--bf16'] where bfloat16 is native, [] (float32) elsewhere. `make demo` asks for these."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return ["--bf16"] if has_native_bf16(device) else []


def use_tf32_on_gpu(device: torch.device, enabled: bool = True) -> str:
    """On a CUDA device, let float32 matmuls run as TF32 on the tensor cores (Ampere and later): PyTorch's
    `set_float32_matmul_precision("high")`, as nanoGPT and litgpt do. The products keep a 10-bit mantissa and
    float32 accumulation, at several times the full float32 rate. `enabled=False` (--no_tf32) keeps PyTorch's
    "highest". On a CPU this changes nothing. Returns the precision now in effect."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if enabled else "highest")
    return torch.get_float32_matmul_precision()
