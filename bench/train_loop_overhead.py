"""How much the shared training loop costs: tokens/s of training.loop.train (plain engine, as pretrain_wm.py
runs it, without evaluation) against a bare forward/backward/AdamW loop on the same model and batches.

    python bench/train_loop_overhead.py [--config tiny] [--steps 40] [--batch_size 8] [--seq_len 256]

Needs a text cache (default cached_datasets/text: `python preprocess_text_dataset.py --dataset_name builtin:text`).
"""

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.text_cache import PackedBatches, TextTokenCache  # noqa: E402
from megatransformer_utils import MegaTransformerConfig  # noqa: E402
from model import build_model  # noqa: E402
from training.arguments import build_parser  # noqa: E402
from training.loop import start_run, train  # noqa: E402
from training.task import TrainingTask  # noqa: E402
from training.schedule import make_optimizer  # noqa: E402


def fresh_model(config):
    torch.manual_seed(0)
    return build_model(config)


def next_token_loss(model, batch: dict, step: int = 0) -> torch.Tensor:
    """batch["input_ids"]: (B, T) -> the mean next-token cross-entropy the model computes from its labels."""
    return model(batch["input_ids"], labels=batch["input_ids"]).loss


def bare_loop(config, batches: PackedBatches, steps: int, lr: float) -> float:
    """Seconds for `steps` of forward, backward, clip, AdamW step: nothing else."""
    model = fresh_model(config).train()
    optimizer = make_optimizer(model, lr, 0.1, (0.9, 0.95))
    start = time.perf_counter()
    for i in range(steps):
        ids = batches.batch(i)
        next_token_loss(model, {"input_ids": ids}).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def our_loop(config, batches: PackedBatches, steps: int, lr: float, runs_dir: str) -> float:
    """Seconds for `steps` of training.loop.train (logging every 10 steps, one checkpoint at the end)."""
    args = build_parser("bench").parse_args([
        "--run_name", "overhead", "--runs_dir", runs_dir, "--max_steps", str(steps), "--learning_rate", str(lr),
        "--logging_steps", "10", "--save_steps", str(10 * steps), "--eval_steps", str(10 * steps),
        "--no_progress_bar", "--overwrite_run"])
    context = start_run(args)
    model = fresh_model(config)
    task = TrainingTask(model=model, config=config, train_batch=lambda i: {"input_ids": batches.batch(i)},
                        loss=next_token_loss, batch_size=lambda b: b["input_ids"].numel())
    start = time.perf_counter()
    train(task, args, context)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--data_dir", default="cached_datasets/text")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cache = TextTokenCache(args.data_dir)
    config = MegaTransformerConfig.from_name(args.config).with_overrides([f"vocab_size={cache.vocab_size}"])
    batches = PackedBatches(cache.tokens("train"), args.seq_len, args.batch_size, seed=42)
    tokens = args.steps * args.batch_size * args.seq_len
    print(f"{datetime.date.today()} torch {torch.__version__}, {torch.get_num_threads()} threads; config {args.config} "
          f"({fresh_model(config).num_parameters() / 1e6:.2f}M), {args.steps} steps of {args.batch_size}x{args.seq_len}")
    bare_loop(config, batches, 3, 1e-3)  # warm up kernels and allocator
    bare, ours = [], []
    with tempfile.TemporaryDirectory() as runs_dir:
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
            bare.append(bare_loop(config, batches, args.steps, 1e-3))
            ours.append(our_loop(config, batches, args.steps, 1e-3, runs_dir))
    bare_tps, our_tps = tokens / sorted(bare)[len(bare) // 2], tokens / sorted(ours)[len(ours) // 2]
    print(f"bare loop        {bare_tps:10,.0f} tokens/s (median of {args.repeats})")
    print(f"training.loop    {our_tps:10,.0f} tokens/s")
    print(f"ratio ours/bare  {our_tps / bare_tps:.3f}  (overhead {100 * (1 - our_tps / bare_tps):.1f}%)")


if __name__ == "__main__":
    main()
