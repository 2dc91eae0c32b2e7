"""The command-line flags every `pretrain_*.py` shares; a script adds its own on top.

The same flag means the same thing in every script. DeepSpeed JSON `"auto"` values are filled from
these (see training/engines.py).
"""

import argparse


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("--run_name", required=True, help="writes runs/RUN_NAME/ (config, checkpoints, TensorBoard)")
    run.add_argument("--runs_dir", default="runs", help="parent directory of run directories")
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--resume_from_checkpoint", metavar="PATH|latest",
                     help="a checkpoint directory, or 'latest' for the newest in runs/RUN_NAME/")
    run.add_argument("--overwrite_run", action="store_true",
                     help="start afresh even if runs/RUN_NAME/ holds checkpoints (deletes the old run)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--max_steps", type=int, default=1000, help="optimizer steps to train for")
    optim.add_argument("--batch_size", type=int, default=8, help="micro-batch size per device (rank)")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--learning_rate", type=float, default=3e-4, help="peak learning rate (AdamW)")
    optim.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine decay ends at this fraction of the peak")
    optim.add_argument("--warmup_steps", type=int, help="linear warmup steps (default: 5%% of max_steps, at most 1000)")
    optim.add_argument("--weight_decay", type=float, default=0.1, help="applied to matrices, not to norms/biases")
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.95)
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    optim.add_argument("--max_consecutive_nonfinite", type=int, default=5,
                       help="stop after this many NaN/inf losses in a row (each one is skipped and counted)")

    precision = parser.add_argument_group("precision and memory")
    dtype = precision.add_mutually_exclusive_group()
    dtype.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    dtype.add_argument("--fp16", action="store_true", help="float16 mixed precision with loss scaling")
    precision.add_argument("--no_tf32", action="store_true",
                           help="on a GPU, keep float32 matmuls in full float32 (default: TF32 tensor cores, as "
                                "torch.set_float32_matmul_precision('high'))")
    precision.add_argument("--use_gradient_checkpointing", action="store_true",
                           help="recompute activations in the backward pass to save memory")

    engine = parser.add_argument_group("engine")
    engine.add_argument("--use_deepspeed", action="store_true", help="train with DeepSpeed (launch with `deepspeed`)")
    engine.add_argument("--deepspeed_config", default="ds_config_zero-2.json")
    engine.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    engine.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    engine.add_argument("--torch_compile", action="store_true",
                        help="compile the trained networks with torch.compile (Inductor): faster steps once the "
                             "first ones have compiled (seconds to minutes); evaluation and samples run eagerly")

    logs = parser.add_argument_group("logging, evaluation, checkpoints")
    logs.add_argument("--logging_steps", type=int, default=10)
    logs.add_argument("--eval_steps", type=int, default=200)
    logs.add_argument("--eval_batches", type=int, default=20, help="validation micro-batches per evaluation")
    logs.add_argument("--save_steps", type=int, default=500)
    logs.add_argument("--save_total_limit", type=int, default=3, help="keep the newest N checkpoints")
    logs.add_argument("--no_progress_bar", action="store_true")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Raise ValueError for flag values that cannot work."""
    positive = ("max_steps", "batch_size", "gradient_accumulation_steps", "logging_steps", "eval_steps",
                "save_steps", "save_total_limit", "eval_batches", "max_consecutive_nonfinite")
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be positive, got {args.learning_rate}")
    if args.warmup_steps is not None and not 0 <= args.warmup_steps <= args.max_steps:
        raise ValueError(f"--warmup_steps must be between 0 and --max_steps={args.max_steps}")
    if not 0 <= args.min_lr_ratio <= 1:
        raise ValueError(f"--min_lr_ratio must be in [0, 1], got {args.min_lr_ratio}")
