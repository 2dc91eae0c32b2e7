"""Training-step time of `tiny` in float32 against bfloat16 on this machine, with the verdict of
training/precision.py (native or emulated bfloat16) beside it.

    python bench/precision_speed.py                    # tiny, batch 8 x 256 tokens, CPU, one thread
    python bench/precision_speed.py --device cuda --config modern_small

Three variants of one training step (forward with labels, backward, AdamW), alternated in each repeat:
float32; bfloat16 autocast over float32 weights (the plain engine's --bf16); bfloat16 weights (DeepSpeed's
--bf16). Prints the median seconds per step and each variant's slowdown against float32, from wall-clock time
and, on CPU, from the process's CPU time (steadier when other jobs share the machine).
A benchmark, not a test.
"""

import argparse
import contextlib
import copy
import datetime
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import cpu_model, sync  # noqa: E402
from megatransformer_utils import MegaTransformerConfig  # noqa: E402
from model import build_model  # noqa: E402
from training.precision import cpu_flags, has_native_bf16  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    return p.parse_args(argv)


def step_fn(model, batch, autocast_dtype):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device_type = batch.device.type

    def step():
        context = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with context:
            loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(MegaTransformerConfig.from_name(args.config)).to(device)
    batch = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), device=device)
    variants = {"float32": step_fn(model, batch, None),
                "bf16 autocast": step_fn(copy.deepcopy(model), batch, torch.bfloat16),
                "bf16 weights": step_fn(copy.deepcopy(model).to(torch.bfloat16), batch, None)}
    wall, cpu = {name: [] for name in variants}, {name: [] for name in variants}
    names = list(variants)
    for i in range(args.warmup + args.steps):
        for name in (names if i % 2 == 0 else names[::-1]):
            sync(args.device)
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            variants[name]()
            sync(args.device)
            if i >= args.warmup:
                wall[name].append(time.perf_counter() - start_wall)
                cpu[name].append(time.process_time() - start_cpu)
    print(f"{datetime.date.today()} {cpu_model() if args.device == 'cpu' else torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, {args.config}, batch {args.batch_size} x {args.seq_len}, "
          f"{args.threads if args.device == 'cpu' else ''} thread(s)")
    if args.device == "cpu":
        print(f"CPU bf16 flags: {sorted(cpu_flags() & {'avx512f', 'avx512_bf16', 'amx_bf16'}) or 'none'}")
    print(f"native bfloat16 per training/precision.py: {has_native_bf16(device)}")
    base_wall, base_cpu = statistics.median(wall["float32"]), statistics.median(cpu["float32"])
    for name in names:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        cpu_text = f", CPU time {c:.2f} s ({c / base_cpu:.2f}x)" if args.device == "cpu" else ""
        print(f"{name:14s} wall {w:.2f} s/step ({w / base_wall:.2f}x float32){cpu_text}")


if __name__ == "__main__":
    main()
