"""The one training loop behind every pretrain_*.py.

A script supplies a `TrainingTask` (the model, a function from micro-batch index to batch, a loss, and
optionally evaluation and samples); the loop owns precision, gradient accumulation, clipping, the
learning-rate schedule, checkpoints and exact resume, NaN handling, signals, logging and the engine.

    context = start_run(args)                  # device, process group, seeds, run directory
    task = TrainingTask(model=..., train_batch=..., loss=..., ...)
    summary = train(task, args, context)
"""

import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml
from torch import nn

from training.checkpoints import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from training.distributed import (all_reduce_sum, barrier, broadcast_flag, choose_device, init_distributed,
                                  is_main_process, rank, world_size)
from training.engines import make_engine
from training.monitor import RunMonitor, gpu_peak_flops

logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row); the message says why and where."""


@dataclass
class RunContext:
    device: torch.device
    run_dir: Path
    rank: int
    world_size: int


@dataclass
class TrainingTask:
    """model: the nn.Module to train. config: its MegaTransformerConfig (saved as config.yaml).
    train_batch(i): this rank's i-th micro-batch, a dict of CPU tensors; a pure function of i (exact resume).
    loss(model, batch) → scalar loss tensor. batch_tokens(batch) → tokens in it (for tokens/s).
    evaluate(model) → {"eval/...": value}, called on every rank (results already reduced over ranks).
    samples(model) → {tag: text} to show in TensorBoard every `generation_steps` (every rank calls it).
    flops_per_token: training FLOPs per token, for MFU on GPUs."""

    model: nn.Module
    config: object
    train_batch: Callable[[int], dict]
    loss: Callable[[nn.Module, dict], torch.Tensor]
    batch_tokens: Callable[[dict], int]
    evaluate: Optional[Callable[[nn.Module], dict]] = None
    samples: Optional[Callable[[nn.Module], dict]] = None
    flops_per_token: Optional[float] = None
    generation_steps: Optional[int] = None


def start_run(args) -> RunContext:
    device = choose_device(args.device)
    init_distributed(args.use_deepspeed, device)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    return RunContext(device=device, run_dir=Path(args.runs_dir) / args.run_name, rank=rank(), world_size=world_size())


class _StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the end of the current step and exits."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def train(task: TrainingTask, args, context: RunContext) -> dict:
    """Train for args.max_steps optimizer steps; returns a summary dict (rank 0's view)."""
    run_dir = context.run_dir
    existing = list_checkpoints(run_dir)
    if existing and not args.resume_from_checkpoint:
        if not args.overwrite_run:
            raise ValueError(f"{run_dir} already holds {existing[-1].name}: pass --resume_from_checkpoint latest to "
                             "continue it, --overwrite_run to start afresh, or another --run_name")
        barrier()
        if is_main_process():
            shutil.rmtree(run_dir)  # checkpoints and TensorBoard events of the old run
    resume_path = resolve_checkpoint(args.resume_from_checkpoint, run_dir) if args.resume_from_checkpoint else None
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        task.config.to_yaml(run_dir / "config.yaml")
    warmup = args.warmup_steps if args.warmup_steps is not None else min(1000, args.max_steps // 20)
    if args.use_gradient_checkpointing:
        task.model.set_gradient_checkpointing(True)
    engine = make_engine(task.model, args, context.device, warmup, context.world_size)
    model = engine.module

    state = {"step": 0, "micro_batches": 0, "skipped_nonfinite": 0, "tokens": 0}
    if resume_path:
        state.update(load_checkpoint(resume_path, model, engine, args.use_deepspeed))
        state.pop("world_size", None)
        if is_main_process():
            logger.info("resumed from %s at step %d", resume_path, state["step"])
    else:
        torch.manual_seed(args.seed + context.rank)  # dropout and sampling differ per rank

    monitor = RunMonitor(run_dir, args.max_steps, state["step"], show_progress=not args.no_progress_bar)
    monitor.text("config", "    " + yaml.safe_dump(task.config.to_dict(), sort_keys=False).replace("\n", "\n    "),
                 state["step"])
    peak_flops = gpu_peak_flops(context.device)
    summary = {"run_dir": str(run_dir)}
    window = {"loss": 0.0, "micro": 0, "tokens": 0, "start": time.perf_counter()}
    consecutive_nonfinite = 0
    stop_reason = None
    forward = getattr(engine, "engine", model)  # DeepSpeed's engine wraps the module's forward

    with _StopSignal() as stop_signal:
        while state["step"] < args.max_steps:
            model.train()
            finite_micro = 0
            while finite_micro < args.gradient_accumulation_steps:
                batch = _to_device(task.train_batch(state["micro_batches"]), context.device)
                state["micro_batches"] += 1
                with engine.autocast():
                    loss = task.loss(forward, batch)
                if broadcast_flag(not bool(torch.isfinite(loss.detach()))):
                    state["skipped_nonfinite"] += 1
                    consecutive_nonfinite += 1
                    monitor.message(f"step {state['step'] + 1}: non-finite loss, micro-batch skipped "
                                    f"({state['skipped_nonfinite']} so far)")
                    if consecutive_nonfinite >= args.max_consecutive_nonfinite:
                        raise TrainingStopped(f"{consecutive_nonfinite} non-finite losses in a row at step "
                                              f"{state['step'] + 1}: lower --learning_rate, check the data, or "
                                              f"resume from an earlier checkpoint")
                    continue
                consecutive_nonfinite = 0
                engine.backward(loss)
                finite_micro += 1
                tokens = task.batch_tokens(batch)
                state["tokens"] += tokens * context.world_size
                window["loss"] += loss.detach().float().item()
                window["micro"] += 1
                window["tokens"] += tokens
            grad_norm = engine.step()
            if grad_norm is None:
                state["skipped_nonfinite"] += 1
                monitor.message(f"step {state['step'] + 1}: non-finite gradients, optimizer step skipped")
            state["step"] += 1
            step = state["step"]
            monitor.advance(1)

            if step % args.logging_steps == 0 or step == args.max_steps:
                totals = all_reduce_sum(torch.tensor([window["loss"], window["micro"], window["tokens"]],
                                                     dtype=torch.float64, device=context.device))
                elapsed = time.perf_counter() - window["start"]
                tokens_per_sec = float(totals[2]) / elapsed
                scalars = {"train/loss": float(totals[0] / totals[1]), "train/lr": engine.learning_rate,
                           "train/tokens_per_sec": tokens_per_sec, "train/skipped_nonfinite": state["skipped_nonfinite"]}
                if grad_norm is not None:
                    scalars["train/grad_norm"] = grad_norm
                if peak_flops and task.flops_per_token:
                    scalars["train/mfu"] = task.flops_per_token * tokens_per_sec / (peak_flops * context.world_size)
                monitor.scalars(scalars, step)
                monitor.advance(0, {"loss": f"{scalars['train/loss']:.4f}", "tok/s": f"{tokens_per_sec:,.0f}"})
                summary["train_loss"] = scalars["train/loss"]
                window = {"loss": 0.0, "micro": 0, "tokens": 0, "start": time.perf_counter()}

            if task.evaluate and (step % args.eval_steps == 0 or step == args.max_steps):
                metrics = task.evaluate(model)
                monitor.scalars(metrics, step)
                monitor.message(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                summary.update(metrics)
            if task.samples and task.generation_steps and (step % task.generation_steps == 0 or step == args.max_steps):
                for tag, text in task.samples(model).items():
                    monitor.text(tag, text, step)
                    summary[tag] = text

            if broadcast_flag(stop_signal.received is not None):
                stop_reason = stop_signal.received or "a signal on another rank"
            if step % args.save_steps == 0 or step == args.max_steps or stop_reason:
                summary["checkpoint"] = str(save_checkpoint(run_dir, step, model, engine, state, args.save_total_limit))
            if stop_reason:
                monitor.message(f"stopped by {stop_reason} at step {step}; resume with --resume_from_checkpoint latest")
                break

    monitor.close()
    summary.update(step=state["step"], skipped_nonfinite=state["skipped_nonfinite"], tokens=state["tokens"],
                   stopped_by=stop_reason)
    return summary


@torch.no_grad()
def evaluate_mean_loss(model: nn.Module, batches: list, loss: Callable, device: torch.device) -> float:
    """Mean of loss(model, batch) over `batches`, spread over the ranks (rank r takes every world_size-th)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches[rank()::world_size()]:
        totals[0] += loss(model, _to_device(batch, device)).float().item()
        totals[1] += 1
    all_reduce_sum(totals)
    model.train(was_training)
    return float(totals[0] / totals[1]) if totals[1] else math.nan
