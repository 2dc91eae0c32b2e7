"""Two ways to run the same training loop: plain PyTorch in one process, or DeepSpeed (ZeRO 1/2/3) launched by
the `deepspeed` CLI on one or many GPUs, or as CPU ranks over gloo on a machine without a GPU.

Both engines take a micro-batch loss at a time:

    engine.backward(loss)        # accumulate (loss is divided by gradient_accumulation_steps inside)
    grad_norm = engine.step()    # clip, optimizer and scheduler step; None when skipped (non-finite grads)
"""

import contextlib
import json
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from training.distributed import barrier, is_distributed
from training.schedule import make_optimizer, make_scheduler

logger = logging.getLogger(__name__)


class ForwardWithConfig:
    """A model's forward, which may be DeepSpeed's engine (whose own `.config` is its JSON config), with the model's
    config beside it: what a loss that reads `model.config` (the diffusion losses) is given while training."""

    def __init__(self, forward, config):
        self.forward, self.config = forward, config

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class PlainEngine:
    """Single-process training: autocast for bf16/fp16 (float32 weights), GradScaler for fp16. With
    --torch_compile the module is compiled in place (`nn.Module.compile`: its weights and state dict unchanged)."""

    def __init__(self, model: nn.Module, args, device: torch.device, warmup_steps: int, learning_rate: float,
                 schedule_steps: int):
        self.module = model.to(device)
        if args.torch_compile:
            self.module.compile()
        self.device = device
        self.accumulation = args.gradient_accumulation_steps
        self.max_grad_norm = args.max_grad_norm
        self.autocast_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        self.optimizer = make_optimizer(model, learning_rate, args.weight_decay, (args.adam_beta1, args.adam_beta2))
        self.scheduler = make_scheduler(self.optimizer, warmup_steps, schedule_steps, args.min_lr_ratio)
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.fp16)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.accumulation).backward()

    def step(self) -> Optional[float]:
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm or float("inf"))
        finite = bool(torch.isfinite(grad_norm))
        if finite or self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # with fp16 the scaler itself skips non-finite steps
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            self.scheduler.step()
            return float(grad_norm)
        return None

    def full_parameters(self):
        """A context in which the module holds all its weights (always, without ZeRO-3)."""
        return contextlib.nullcontext()

    @property
    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_state(self, directory: Path) -> None:
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict()}, directory / "optimizer.pt")

    def load_state(self, directory: Path) -> None:
        path = directory / "optimizer.pt"
        if not path.is_file():
            raise ValueError(f"{directory} has no optimizer.pt: it was not written by the plain engine "
                             "(a DeepSpeed checkpoint resumes with --use_deepspeed)")
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def resolve_deepspeed_config(path: str, args, world_size: int) -> dict:
    """Read a DeepSpeed JSON and fill its "auto" values (and the batch/precision keys) from our flags."""
    config_path = Path(path)
    if not config_path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {config_path} not found (the repo ships ds_config_zero-1.json, "
                                "ds_config_zero-2.json and ds_config_zero-3.json)")
    config = json.loads(config_path.read_text())
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ValueError(f"{config_path} has an '{section}' section: the optimizer (AdamW) and the warmup-cosine "
                             "schedule come from --learning_rate, --weight_decay, --warmup_steps...; remove it")
    filled = {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_batch_size": args.batch_size * args.gradient_accumulation_steps * world_size,
        "gradient_clipping": args.max_grad_norm,
    }
    for key, value in filled.items():
        if config.get(key, "auto") not in ("auto", value):
            logger.warning("DeepSpeed config sets %s=%s; using the flag value %s", key, config[key], value)
        config[key] = value
    config["bf16"] = {**config.get("bf16", {}), "enabled": bool(args.bf16)}
    config["fp16"] = {**config.get("fp16", {}), "enabled": bool(args.fp16)}
    config.setdefault("steps_per_print", 10 ** 9)  # our loop does the logging
    return config


class DeepSpeedEngine:
    """DeepSpeed's engine with our AdamW and schedule. Gradient accumulation, clipping, loss scaling and
    ZeRO partitioning are DeepSpeed's; under bf16 the module's weights are bfloat16 with float32 masters.
    --torch_compile calls DeepSpeed's `engine.compile()`, which compiles the module in place."""

    def __init__(self, model: nn.Module, args, device: torch.device, warmup_steps: int, world_size: int,
                 learning_rate: float, schedule_steps: int):
        import deepspeed

        config = resolve_deepspeed_config(args.deepspeed_config, args, world_size)
        optimizer = make_optimizer(model, learning_rate, args.weight_decay, (args.adam_beta1, args.adam_beta2))
        scheduler = make_scheduler(optimizer, warmup_steps, schedule_steps, args.min_lr_ratio)
        half = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        if half is not None:
            _batch_norms_to(model, half)
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model.to(device), optimizer=optimizer,
                                                                 lr_scheduler=scheduler, config=config)
        if args.torch_compile:
            self.engine.compile()
        self.module = self.engine.module
        self.device = device
        self.accumulation = args.gradient_accumulation_steps
        self._micro_steps = 0

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed casts the module itself

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self._micro_steps += 1
        if self._micro_steps % self.accumulation:
            self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step

    def step(self) -> Optional[float]:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return norm if torch.isfinite(torch.tensor(norm)) else None

    def full_parameters(self):
        """ZeRO-3 partitions the weights themselves: gather them on every rank (all ranks must enter)."""
        if self.engine.zero_optimization_stage() != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    @property
    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_state(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state")

    def load_state(self, directory: Path) -> None:
        if not (directory / "deepspeed").is_dir():
            raise ValueError(f"{directory} has no deepspeed/ state: it was written by the plain engine "
                             "(resume it without --use_deepspeed)")
        self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state")
        barrier()


def _batch_norms_to(model: nn.Module, dtype: torch.dtype) -> None:
    """DeepSpeed casts parameters to the half dtype but leaves buffers alone, and batch norm needs its running
    statistics in the dtype of its weights: cast batch norms whole. Other buffers keep their dtype (the rotary
    inv_freq, for one, must stay float32)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.to(dtype)


def make_engine(model: nn.Module, args, device: torch.device, warmup_steps: int, world_size: int,
                learning_rate: Optional[float] = None, schedule_steps: Optional[int] = None):
    """An engine training `model` with AdamW at `learning_rate` (default --learning_rate) under a warmup-cosine
    schedule over `schedule_steps` optimizer steps (default --max_steps)."""
    learning_rate = learning_rate or args.learning_rate
    schedule_steps = schedule_steps or args.max_steps
    if args.use_deepspeed:
        return DeepSpeedEngine(model, args, device, warmup_steps, world_size, learning_rate, schedule_steps)
    if is_distributed():
        raise ValueError("several ranks were launched without --use_deepspeed: add --use_deepspeed")
    return PlainEngine(model, args, device, warmup_steps, learning_rate, schedule_steps)
