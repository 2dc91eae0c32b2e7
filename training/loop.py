"""The one training loop behind every pretrain_*.py.

A script supplies a `TrainingTask` (training/task.py: the model, a function from micro-batch index to batch,
a loss, optionally evaluation, samples and a GAN adversary); the loop owns precision, gradient accumulation,
clipping, the learning-rate schedules, checkpoints and exact resume, NaN handling, signals, logging and the
engines (one per trained network).

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

from training.checkpoints import Engines, list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from training.distributed import (all_reduce_sum, barrier, broadcast_flag, choose_device, init_distributed,
                                  is_main_process, rank, union_over_ranks, world_size)
from training.engines import make_engine
from training.monitor import RunMonitor, gpu_peak_flops
from training.precision import use_tf32_on_gpu, warn_if_bf16_is_emulated
from training.task import LossTerms, TrainingTask, as_loss_terms

logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row); the message says why and where."""


@dataclass
class RunContext:
    device: torch.device
    run_dir: Path
    rank: int
    world_size: int


def start_run(args) -> RunContext:
    device = choose_device(args.device)
    init_distributed(args.use_deepspeed, device)
    use_tf32_on_gpu(device, enabled=not args.no_tf32)
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


def _set_requires_grad(module: nn.Module, enabled: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(enabled)


class _Window:
    """Sums of the logged values since the last log line; reduced over ranks when logged. The sums stay on the
    device until then, so adding a micro-batch's values does not wait for the device (no `.item()` per step)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}
        self.units = 0.0
        self.start = time.perf_counter()

    def add(self, prefix: str, terms: LossTerms) -> None:
        values = {f"{prefix}loss": terms.loss, **{prefix + key: value for key, value in terms.logs.items()}}
        for key, value in values.items():
            value = value.detach().reshape(()).double() if isinstance(value, torch.Tensor) else float(value)
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self, device: torch.device) -> tuple[dict, float]:
        """({key: mean over micro-batches and ranks}, summed units of every rank)."""
        keys = sorted(self.sums)
        sums = [torch.as_tensor(self.sums[k], dtype=torch.float64, device=device) for k in keys]
        counts = torch.tensor([self.counts[k] for k in keys] + [self.units], dtype=torch.float64, device=device)
        totals = all_reduce_sum(torch.cat([torch.stack(sums), counts]))
        n = len(keys)
        return {key: float(totals[i] / totals[n + i]) for i, key in enumerate(keys)}, float(totals[-1])


def _prepare(task: TrainingTask, args, context: RunContext) -> Optional[Path]:
    """Check the run directory against --resume_from_checkpoint/--overwrite_run and write config.yaml;
    returns the checkpoint to resume from, if any."""
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
        warn_if_bf16_is_emulated(args.bf16, context.device)
    if args.use_gradient_checkpointing:
        if not hasattr(task.model, "set_gradient_checkpointing"):
            raise ValueError(f"--use_gradient_checkpointing: {type(task.model).__name__} does not support it")
        task.model.set_gradient_checkpointing(True)
    return resume_path


def train(task: TrainingTask, args, context: RunContext) -> dict:
    """Train for args.max_steps optimizer steps; returns a summary dict (rank 0's view)."""
    run_dir = context.run_dir
    resume_path = _prepare(task, args, context)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(1000, args.max_steps // 20)
    engine = make_engine(task.model, args, context.device, warmup, context.world_size)
    model = engine.module
    adversary, adversary_engine = task.adversary, None
    if adversary:
        adversary_steps = max(1, args.max_steps - adversary.start_step)
        adversary_engine = make_engine(adversary.module, args, context.device, min(warmup, adversary_steps // 20),
                                       context.world_size, learning_rate=adversary.learning_rate,
                                       schedule_steps=adversary_steps)
    engines = Engines(model, engine, adversary.name if adversary else None, adversary_engine, task.extra_state)

    state = {"step": 0, "micro_batches": 0, "skipped_nonfinite": 0, "tokens": 0}
    if resume_path:
        state.update(load_checkpoint(resume_path, engines, args.use_deepspeed))
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
    window = _Window()
    consecutive_nonfinite = 0
    stop_reason = None
    forward = getattr(engine, "engine", model)  # DeepSpeed's engine wraps the module's forward
    discriminator = getattr(adversary_engine, "engine", adversary_engine and adversary_engine.module)
    unit = task.throughput_unit

    with _StopSignal() as stop_signal:
        while state["step"] < args.max_steps:
            model.train()
            adversary_on = adversary is not None and state["step"] >= adversary.start_step
            finite_micro = 0
            while finite_micro < args.gradient_accumulation_steps:
                batch = _to_device(task.train_batch(state["micro_batches"]), context.device)
                state["micro_batches"] += 1
                terms, adversary_terms = _micro_batch_losses(task, forward, discriminator, engine, adversary_engine,
                                                             batch, state["step"], adversary_on)
                losses = [terms.loss] + ([adversary_terms.loss] if adversary_terms else [])
                if broadcast_flag(not all(bool(torch.isfinite(loss.detach())) for loss in losses)):
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
                engine.backward(terms.loss)
                window.add("", terms)
                if adversary_terms:
                    adversary_engine.backward(adversary_terms.loss)
                    window.add(f"{adversary.name}/", adversary_terms)
                finite_micro += 1
                units = task.batch_size(batch)
                state["tokens"] += units * context.world_size
                window.units += units
            grad_norm = engine.step()
            if grad_norm is None:
                state["skipped_nonfinite"] += 1
                monitor.message(f"step {state['step'] + 1}: non-finite gradients, optimizer step skipped")
            adversary_norm = adversary_engine.step() if adversary_on else None
            state["step"] += 1
            step = state["step"]
            if task.after_step:
                task.after_step(model, step)
            monitor.advance(1)

            if step % args.logging_steps == 0 or step == args.max_steps:
                means, units = window.means(context.device)
                per_sec = units / (time.perf_counter() - window.start)
                scalars = {f"train/{key}": value for key, value in means.items()}
                scalars.update({"train/lr": engine.learning_rate, f"train/{unit}_per_sec": per_sec,
                                "train/skipped_nonfinite": state["skipped_nonfinite"]})
                if grad_norm is not None:
                    scalars["train/grad_norm"] = grad_norm
                if adversary_on:
                    scalars[f"train/{adversary.name}/lr"] = adversary_engine.learning_rate
                    if adversary_norm is not None:
                        scalars[f"train/{adversary.name}/grad_norm"] = adversary_norm
                if peak_flops and task.flops_per_token:
                    scalars["train/mfu"] = task.flops_per_token * per_sec / (peak_flops * context.world_size)
                monitor.scalars(scalars, step)
                monitor.advance(0, {"loss": f"{scalars['train/loss']:.4f}", f"{unit}/s": f"{per_sec:,.0f}"})
                summary["train_loss"] = scalars["train/loss"]
                window = _Window()

            if task.evaluate and (step % args.eval_steps == 0 or step == args.max_steps):
                with torch.compiler.set_stance("force_eager"):  # --torch_compile: only training steps compile
                    metrics = task.evaluate(model)
                monitor.scalars(metrics, step)
                monitor.message(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                summary.update(metrics)
            if task.samples and task.generation_steps and (step % task.generation_steps == 0 or step == args.max_steps):
                with torch.compiler.set_stance("force_eager"):
                    samples = task.samples(model)
                for tag, sample in samples.items():
                    monitor.sample(tag, sample, step)
                    if isinstance(sample, str):
                        summary[tag] = sample

            if broadcast_flag(stop_signal.received is not None):
                stop_reason = stop_signal.received or "a signal on another rank"
            if step % args.save_steps == 0 or step == args.max_steps or stop_reason:
                summary["checkpoint"] = str(save_checkpoint(run_dir, step, engines, state, args.save_total_limit))
            if stop_reason:
                monitor.message(f"stopped by {stop_reason} at step {step}; resume with --resume_from_checkpoint latest")
                break

    monitor.close()
    summary.update(step=state["step"], skipped_nonfinite=state["skipped_nonfinite"], tokens=state["tokens"],
                   stopped_by=stop_reason)
    return summary


def _micro_batch_losses(task, forward, discriminator, engine, adversary_engine, batch, step, adversary_on):
    """The model's LossTerms and, once the adversary has started, the adversary's (None before)."""
    if task.adversary is None:
        with engine.autocast():
            return as_loss_terms(task.loss(forward, batch, step)), None
    # The model's loss gets the discriminator's plain module, frozen: the model's backward must not reach the
    # discriminator, and a DeepSpeed engine treats every backward through its forward's outputs as its own.
    adversary_module = adversary_engine.module
    _set_requires_grad(adversary_module, False)
    try:
        with engine.autocast():
            terms = as_loss_terms(task.loss(forward, batch, step, adversary_module if adversary_on else None))
    finally:
        _set_requires_grad(adversary_module, True)
    if not adversary_on:
        return terms, None
    outputs = {key: value.detach() for key, value in terms.outputs.items()}
    with adversary_engine.autocast():
        return terms, as_loss_terms(task.adversary.loss(discriminator, batch, outputs))


@torch.no_grad()
def evaluate_means(model: nn.Module, batches: list, measure: Callable, device: torch.device) -> dict:
    """{name: mean over `batches`} of measure(model, batch) → {name: scalar}, in eval mode, spread over the
    ranks (rank r takes every world_size-th batch). NaN when there are no batches."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    count = 0
    for batch in batches[rank()::world_size()]:
        for name, value in measure(model, _to_device(batch, device)).items():
            sums[name] = sums.get(name, 0.0) + float(value)
        count += 1
    model.train(was_training)
    names = union_over_ranks(sums)  # a rank left without a batch still joins the reduction
    totals = all_reduce_sum(torch.tensor([sums.get(n, 0.0) for n in names] + [count], dtype=torch.float64,
                                         device=device))
    return {name: float(totals[i] / totals[-1]) if totals[-1] else math.nan for i, name in enumerate(names)}
