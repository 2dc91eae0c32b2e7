"""AdamW as the training loop runs it (PyTorch's fused kernel, `training.schedule.make_optimizer`) against
PyTorch's default implementation (one tensor at a time on a CPU, `foreach` on CUDA), in one process:

1. the optimizer step alone, on the parameters of a causal LM config → milliseconds per step
   (the explicit `foreach` implementation too, CUDA's default);
2. a whole training step (forward with labels, backward, AdamW step) with each optimizer → tokens/s.

    python bench/adamw_speed.py                                   # tiny, vocabulary 8192, batch 8 x 256, CPU
    python bench/adamw_speed.py --config modern_small --batch-size 4 --seq-len 256 --threads 1
    python bench/adamw_speed.py --config modern_medium --vocab-size 32000 --device cuda --bf16 --batch-size 8 \
        --seq-len 2048

The variants alternate in every repeat (after warmup). "paired" is the median of the per-repeat ratios, steadier
on a shared machine than the ratio of the medians. A benchmark, not a test.
"""

import argparse
import copy
import datetime
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import interleaved_times, start_speed_run  # noqa: E402
from megatransformer_utils import MegaTransformerConfig  # noqa: E402
from model import build_model  # noqa: E402
from training.schedule import make_optimizer  # noqa: E402

LEARNING_RATE, WEIGHT_DECAY, BETAS = 3e-4, 0.1, (0.9, 0.95)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="tiny", help="a causal config name or YAML file")
    p.add_argument("--vocab-size", type=int, default=8192, help="overrides the config's (the text cache's size)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2, help="untimed repeats per variant and measurement")
    p.add_argument("--steps", type=int, default=10, help="timed repeats per variant and measurement")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--bf16", action="store_true", help="forward under bfloat16 autocast, as the loop's --bf16 does "
                                                       "(the weights and the optimizer stay float32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def default_adamw(model: torch.nn.Module, **implementation) -> torch.optim.AdamW:
    """make_optimizer's parameter groups and hyperparameters in PyTorch's default implementation (or the one
    `implementation` names: foreach=True)."""
    groups = make_optimizer(model, LEARNING_RATE, WEIGHT_DECAY, BETAS).param_groups
    return torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                             lr=LEARNING_RATE, betas=BETAS, **implementation)


VARIANTS = {  # name → a function making the optimizer of a model
    "PyTorch default": default_adamw,
    "foreach": lambda model: default_adamw(model, foreach=True),
    "fused (ours)": lambda model: make_optimizer(model, LEARNING_RATE, WEIGHT_DECAY, BETAS),
}


def optimizer_step_fn(model: torch.nn.Module, make):
    """One step of the optimizer make(copy) on a private copy of model, with fixed random gradients."""
    model = copy.deepcopy(model)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    return make(model).step


def train_step_fn(model: torch.nn.Module, batch: torch.Tensor, make, bf16: bool):
    """One forward (with labels) + backward + step of the optimizer make(copy) on a private copy of model."""
    model = copy.deepcopy(model).train()
    optimizer = make(model)

    def step():
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def summarize(times: dict, reference: str, work: float) -> dict:
    """{name: (work per second, ratio to reference's median, paired ratio)}; work = 1 gives steps per second."""
    base = statistics.median(times[reference])
    return {name: (work / statistics.median(t), base / statistics.median(t),
                   statistics.median(r / s for r, s in zip(times[reference], t))) for name, t in times.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    device_name = start_speed_run(args)
    config = MegaTransformerConfig.from_name(args.config).with_overrides([f"vocab_size={args.vocab_size}"])
    torch.manual_seed(0)
    model = build_model(config).to(args.device)
    print(f"date {datetime.datetime.now():%Y-%m-%d %H:%M}  torch {torch.__version__}  threads "
          f"{torch.get_num_threads()}  device {args.device}: {device_name}")
    print(f"model {args.config}, vocabulary {args.vocab_size}: {model.num_parameters() / 1e6:.2f} M parameters, "
          f"float32 weights{', bfloat16 autocast' if args.bf16 else ''}; {args.warmup} warmup + {args.steps} "
          "timed repeats")

    alone = summarize(interleaved_times({name: optimizer_step_fn(model, make) for name, make in VARIANTS.items()},
                                        args.warmup, args.steps, args.device), "PyTorch default", 1)
    print("\noptimizer step alone       ms/step   speedup   (paired)")
    for name, (per_second, ratio, paired) in alone.items():
        print(f"  {name:22s} {1000 / per_second:9.1f}   {ratio:6.2f}x   ({paired:.2f}x)")

    batch = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=args.device)
    training = summarize(interleaved_times({name: train_step_fn(model, batch, VARIANTS[name], args.bf16)
                                            for name in ("PyTorch default", "fused (ours)")},
                                           args.warmup, args.steps, args.device), "PyTorch default", batch.numel())
    print(f"\ntraining step, {args.batch_size} x {args.seq_len}  tokens/s   speedup   (paired)")
    for name, (per_second, ratio, paired) in training.items():
        print(f"  {name:22s} {per_second:9,.0f}   {ratio:6.3f}x   ({paired:.3f}x)")


if __name__ == "__main__":
    main()
