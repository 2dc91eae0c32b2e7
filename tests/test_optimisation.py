"""What the training loop's plain engine does to the gradients and the weights: the warmup-cosine schedule against
transformers', weight decay on matrices only, --max_grad_norm, the skipped step after non-finite gradients,
--fp16 loss scaling, Ctrl-C (SIGINT), and that --use_gradient_checkpointing reaches the model."""

import math
import os
import signal

import pytest
import torch
from torch import nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from helpers import (checkpoint_names, checkpoint_weights, count_calls, differs, loop_args, only_events, scalars,
                     tiny_lm_task, trainer_state)
from training.arguments import build_parser, check_arguments
from training.engines import PlainEngine
from training.loop import start_run, train
from training.schedule import make_optimizer, warmup_cosine


def parse(*flags):
    args = build_parser("x").parse_args(["--run_name", "x", *map(str, flags)])
    check_arguments(args)
    return args


class TwoLayers(nn.Module):
    """A linear layer (a matrix and a bias) and a layer norm (a weight and a bias)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, x):
        return self.norm(self.linear(x))


def engine_for(*flags, warmup: int = 0) -> PlainEngine:
    """A plain engine training TwoLayers() at peak learning rate 1e-2 for 10 steps, on CPU."""
    return PlainEngine(TwoLayers(), parse(*flags), torch.device("cpu"), warmup, 1e-2, 10)


# ----- the learning-rate schedule -----

@pytest.mark.parametrize("warmup, steps, min_ratio", [(5, 40, 0.1), (0, 12, 0.0), (3, 3, 0.5), (1, 7, 1.0)])
def test_schedule_is_transformers_cosine_with_min_lr(warmup, steps, min_ratio):
    """The learning rate of each optimizer step, as the engine applies it, is transformers' warmup-cosine one, except
    that our warmup starts one step later in its ramp: the first step trains at peak / warmup, not at 0."""
    peak = 1e-2
    reference_optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
    reference = get_cosine_with_min_lr_schedule_with_warmup(reference_optimizer, warmup, steps, min_lr_rate=min_ratio)
    reference_lrs = []
    for _ in range(steps + 1):
        reference_lrs.append(reference_optimizer.param_groups[0]["lr"])
        reference_optimizer.step()
        reference.step()

    engine = PlainEngine(TwoLayers(), parse("--min_lr_ratio", min_ratio), torch.device("cpu"), warmup, peak, steps)
    ours = []
    for _ in range(steps):
        ours.append(engine.optimizer.param_groups[0]["lr"])  # the rate of the coming step
        engine.backward(engine.module(torch.ones(2, 4)).square().sum())
        assert engine.step() is not None
    expected = [reference_lrs[step + 1] if step < warmup else reference_lrs[step] for step in range(steps)]
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert engine.learning_rate == pytest.approx(reference_lrs[steps], rel=1e-12, abs=1e-15)  # logged at the end
    assert [peak * warmup_cosine(warmup, steps, min_ratio)(step) for step in range(steps)] == pytest.approx(ours)


# ----- weight decay -----

def test_weight_decay_reaches_matrices_only():
    """AdamW with a zero gradient moves nothing but the decay: a matrix shrinks by lr x weight_decay, the biases and
    the norm's weight stay as they are."""
    model = TwoLayers()
    optimizer = make_optimizer(model, 0.01, 0.5, (0.9, 0.95))
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] == 0.5 for p in group["params"]}
    undecayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] == 0.0 for p in group["params"]}
    assert decayed == {id(model.linear.weight)}
    assert undecayed == {id(model.linear.bias), id(model.norm.weight), id(model.norm.bias)}

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(model.linear.weight, before["linear.weight"] * (1 - 0.01 * 0.5), rtol=1e-6, atol=0)
    for name in ("linear.bias", "norm.weight", "norm.bias"):
        assert torch.equal(dict(model.named_parameters())[name], before[name]), name


def test_the_fused_update_is_pytorchs_adamw():
    """make_optimizer runs PyTorch's fused AdamW kernel on a CPU; ten steps of it move the weights as PyTorch's
    reference implementation (one tensor at a time) does, to float32 rounding."""
    fused_model, reference_model = TwoLayers(), TwoLayers()
    fused = make_optimizer(fused_model, 0.01, 0.1, (0.9, 0.95))
    assert fused.defaults["fused"] is True
    reference = torch.optim.AdamW([{"params": [reference_model.linear.weight], "weight_decay": 0.1},
                                   {"params": [reference_model.linear.bias, *reference_model.norm.parameters()],
                                    "weight_decay": 0.0}], lr=0.01, betas=(0.9, 0.95), foreach=False)
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        x = torch.randn(5, 4, generator=generator)
        for model, optimizer in ((fused_model, fused), (reference_model, reference)):
            model(x).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for (name, ours), theirs in zip(fused_model.named_parameters(), reference_model.parameters()):
        assert not torch.equal(ours, TwoLayers().state_dict()[name]), name  # it moved
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)


def test_frozen_parameters_are_not_optimised():
    model = TwoLayers()
    model.norm.requires_grad_(False)
    optimizer = make_optimizer(model, 0.01, 0.1, (0.9, 0.95))
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == \
        {id(model.linear.weight), id(model.linear.bias)}


# ----- gradient clipping -----

def grad_norm(module: nn.Module) -> float:
    """The L2 norm of all of the module's gradients together."""
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()])))


def grads_at_optimizer_step(engine: PlainEngine) -> list:
    """Patches the engine's optimizer to record the gradient norm it is handed at each step."""
    seen = []
    original = engine.optimizer.step

    def step(*args, **kwargs):
        seen.append(grad_norm(engine.module))
        return original(*args, **kwargs)

    engine.optimizer.step = step
    return seen


@pytest.mark.parametrize("max_grad_norm", [0.5, 0.0, 1000.0])
def test_max_grad_norm_clips_the_gradient_the_optimizer_sees(max_grad_norm):
    engine = engine_for("--max_grad_norm", max_grad_norm, "--gradient_accumulation_steps", 2)
    seen = grads_at_optimizer_step(engine)
    x = torch.linspace(-3, 3, 8).reshape(2, 4)
    for _ in range(2):  # two micro-batches of one step: their mean is the gradient
        engine.backward(engine.module(x).pow(3).sum())
    reference = TwoLayers()  # the same weights
    reference(x).pow(3).sum().backward()
    raw_norm = grad_norm(reference)
    assert raw_norm > 10  # far above the 0.5 limit
    assert engine.step() == pytest.approx(raw_norm, rel=1e-5)  # the logged norm is the one before clipping
    assert seen[0] == pytest.approx(min(raw_norm, max_grad_norm or math.inf), rel=1e-5)


# ----- non-finite gradients: the optimizer step is skipped -----

def test_nonfinite_gradients_skip_the_optimizer_and_scheduler_step():
    engine = engine_for(warmup=4)
    before = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    lr = engine.learning_rate
    # a finite loss whose gradient is infinite: d/dw sqrt(w - w) at 0
    weight = engine.module.linear.weight
    engine.backward(engine.module(torch.ones(1, 4)).sum() + torch.sqrt((weight - weight.detach()).sum()))
    assert engine.step() is None
    for name, parameter in engine.module.named_parameters():
        assert torch.equal(parameter, before[name]), name
        assert parameter.grad is None  # nothing left over for the next step
    assert engine.learning_rate == lr and engine.optimizer.state == {}

    engine.backward(engine.module(torch.ones(1, 4)).sum())  # the next finite step trains as a first step would
    assert engine.step() is not None
    assert engine.learning_rate > lr
    assert differs(before, {name: p.detach() for name, p in engine.module.named_parameters()})


# ----- fp16 loss scaling -----

def test_fp16_scales_the_loss_and_unscales_before_clipping():
    engine = engine_for("--fp16", "--max_grad_norm", 0.5)
    reference = engine_for()
    scale = engine.scaler.get_scale()
    assert scale == 2.0 ** 16  # GradScaler's initial scale
    x = torch.linspace(-1, 1, 8).reshape(2, 4)
    for each in (engine, reference):
        each.backward(each.module(x).square().sum())
    # the stored gradients are those of scale x loss (float32 weights; the loss is float32 outside autocast)
    for (name, p), q in zip(engine.module.named_parameters(), reference.module.parameters()):
        torch.testing.assert_close(p.grad, q.grad * scale, rtol=1e-5, atol=0, msg=name)
    seen = grads_at_optimizer_step(engine)
    assert engine.step() == pytest.approx(grad_norm(reference.module), rel=1e-5)  # unscaled before the norm is taken
    assert seen[0] == pytest.approx(0.5, rel=1e-5)  # and clipped unscaled


def test_fp16_overflow_skips_the_step_and_lowers_the_scale():
    engine = engine_for("--fp16")
    before = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    loss = engine.module(torch.ones(1, 4)).sum() * 1e35  # finite; times the scale 65536 its gradients overflow
    assert torch.isfinite(loss)
    engine.backward(loss)
    assert engine.step() is None
    assert engine.scaler.get_scale() == 2.0 ** 15  # backoff factor 0.5
    for name, parameter in engine.module.named_parameters():
        assert torch.equal(parameter, before[name]), name


def test_fp16_autocast_runs_matmuls_in_half_precision():
    engine = engine_for("--fp16")
    with engine.autocast():
        assert engine.module.linear(torch.ones(1, 4)).dtype == torch.float16


# ----- the loop: SIGINT, gradient checkpointing -----

def test_ctrl_c_saves_a_checkpoint_and_stops(tmp_path):
    """The README promises that Ctrl-C (SIGINT) stops a run cleanly with a checkpoint of the step it was in."""
    task = tiny_lm_task()
    task.after_step = lambda model, step: os.kill(os.getpid(), signal.SIGINT) if step == 2 else None
    args = loop_args(tmp_path, "x", "--max_steps", 5)
    previous = signal.getsignal(signal.SIGINT)
    summary = train(task, args, start_run(args))
    assert summary["stopped_by"] == "SIGINT" and summary["step"] == 2
    assert checkpoint_names(tmp_path / "x") == ["checkpoint-2"]
    assert trainer_state(tmp_path / "x" / "checkpoint-2")["step"] == 2
    assert sorted(scalars(only_events(tmp_path / "x"), "train/loss")) == [1, 2]
    assert signal.getsignal(signal.SIGINT) is previous  # the loop gives the handler back


def test_gradient_checkpointing_flag_reaches_the_model(tmp_path):
    """With --use_gradient_checkpointing each block runs twice per micro-batch (forward, then again in the
    backward pass); without it once."""
    counts = {}
    for flag in ((), ("--use_gradient_checkpointing",)):
        task = tiny_lm_task()
        args = loop_args(tmp_path, f"run{len(flag)}", "--max_steps", 1, *flag)
        with count_calls(task.model.blocks) as calls:
            train(task, args, start_run(args))
        counts[flag] = calls
    assert counts[()] == {0: 1, 1: 1}
    assert counts[("--use_gradient_checkpointing",)] == {0: 2, 1: 2}
    weights = [checkpoint_weights(tmp_path / f"run{n}", 1) for n in (0, 1)]
    for name in weights[0]:  # and it changes nothing else
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-5, atol=1e-7, msg=name)
