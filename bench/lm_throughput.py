"""Throughput of MegaTransformerCausalLM against Hugging Face's LlamaForCausalLM with the same weights.

    python bench/lm_throughput.py                     # defaults: ~30M-parameter Llama, float32, CPU
    python bench/lm_throughput.py --dtype bfloat16 --device cuda --hidden-size 2048 --layers 16

Builds a Llama-style model from a LlamaConfig, converts it with `convert_hf_model`, checks that the
logits agree, then times in one process, alternating the two models in each repeat (after warmup):

1. a training step: forward with labels, backward, AdamW step (a fresh AdamW per model) → tokens/s;
2. greedy KV-cache generation of exactly N new tokens from a batch of prompts → new tokens/s,
   and checks that both models generate the same tokens.

Rates come from the median time, with the ratio ours/HF (> 1: ours is faster) of the medians and the
"paired" ratio: the median of the per-repeat ratios, steadier on a shared machine whose speed drifts.
The training step's achieved FLOP/s (our `flops_per_token`, the same count for both models) is
compared with a measured matmul peak (MFU on CUDA).
A benchmark, not a test: nothing here is asserted by the test suite.
"""

import argparse
import copy
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from model.hf_conversion import convert_hf_model  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads (GQA when < --heads)")
    p.add_argument("--intermediate-size", type=int, default=1408)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=4, help="training batch size")
    p.add_argument("--seq-len", type=int, default=256, help="training sequence length")
    p.add_argument("--gen-batch-size", type=int, default=4, help="prompts generated from at once")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2, help="untimed repeats per model and measurement")
    p.add_argument("--steps", type=int, default=10, help="timed repeats per model and measurement")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    """Seconds one call of fn takes, with the device synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved_times(fns: dict, warmup: int, repeats: int, device: str) -> dict:
    """Seconds per call of each fn in fns (a list of `repeats` each), run in alternating order per repeat."""
    times = {name: [] for name in fns}
    names = list(fns)
    for i in range(warmup + repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            seconds = timed(fns[name], device)
            if i >= warmup:
                times[name].append(seconds)
    return times


def summarize(work: float, times: dict) -> dict:
    """{"HF": rate, "ours": rate, "ratio": ours/HF, "paired": ours/HF}: rates are work / median seconds;
    "paired" is the median over repeats of HF's time / ours in the same repeat, which cancels slow drift
    in machine speed (other jobs on a shared machine) that the ratio of medians does not."""
    result = {name: work / statistics.median(t) for name, t in times.items()}
    result["ratio"] = result["ours"] / result["HF"]
    result["paired"] = statistics.median(hf / ours for hf, ours in zip(times["HF"], times["ours"]))
    return result


def matmul_peak_flops(dtype: torch.dtype, device: str, n: int = 2048, repeats: int = 10) -> float:
    """Best FLOP/s of an (n, n) @ (n, n) torch.mm in dtype: the machine's practical matmul peak."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    torch.mm(a, b)
    return 2 * n**3 / min(timed(lambda: torch.mm(a, b), device) for _ in range(repeats))


def build_models(args) -> tuple[LlamaForCausalLM, torch.nn.Module]:
    """A random Llama (SDPA attention) and our conversion of it, both in args.dtype on args.device."""
    config = LlamaConfig(hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         intermediate_size=args.intermediate_size, vocab_size=args.vocab_size,
                         max_position_embeddings=max(args.seq_len, args.prompt_len + args.new_tokens),
                         attn_implementation="sdpa")
    torch.manual_seed(args.seed)
    hf = LlamaForCausalLM(config).eval()
    ours = convert_hf_model(hf)
    dtype = DTYPES[args.dtype]
    return hf.to(args.device, dtype), ours.to(args.device, dtype)


def logits_max_diff(hf, ours, args) -> float:
    """Largest |logit difference| between the two models on a random (2, ≤64) batch."""
    ids = torch.randint(0, args.vocab_size, (2, min(args.seq_len, 64)), device=args.device)
    with torch.no_grad():
        return (hf(ids).logits.float() - ours(ids).logits.float()).abs().max().item()


def train_step_fn(model, batch: torch.Tensor):
    """A function running one forward (with labels) + backward + AdamW step on a private copy of model."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step():
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def bench_training(hf, ours, args) -> dict:
    """Tokens/s of a full training step for each model."""
    batch = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=args.device)
    times = interleaved_times({"HF": train_step_fn(hf, batch), "ours": train_step_fn(ours, batch)},
                              args.warmup, args.steps, args.device)
    return summarize(batch.numel(), times)


def bench_generation(hf, ours, args) -> tuple[dict, bool]:
    """New tokens/s of greedy generation for each model, and whether their tokens agree."""
    prompts = torch.randint(0, args.vocab_size, (args.gen_batch_size, args.prompt_len), device=args.device)
    mask = torch.ones_like(prompts)
    hf.generation_config.eos_token_id = None  # greedy for exactly N tokens, as ours with eos_token_id=None
    hf.generation_config.pad_token_id = 0
    n = args.new_tokens
    outputs = {}

    def run_hf():
        outputs["HF"] = hf.generate(prompts, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n)

    def run_ours():
        outputs["ours"] = ours.generate(prompts, attention_mask=mask, max_new_tokens=n, eos_token_id=None)

    times = interleaved_times({"HF": run_hf, "ours": run_ours}, args.warmup, args.steps, args.device)
    return summarize(prompts.shape[0] * n, times), torch.equal(outputs["HF"], outputs["ours"])


def report(args, train: dict, generation: dict, same_tokens: bool, peak: float, flops_per_token: float) -> None:
    """train/generation: summarize() results. Ratios are ours/HF (> 1: ours is faster)."""
    print(f"\n{'median of ' + str(args.steps) + ' repeats':<30}{'HF':>10}{'ours':>10}{'ours/HF':>9}{'paired':>9}")
    for label, r, fmt in (("train step, tokens/s", train, ".0f"), ("generation, new tokens/s", generation, ".1f")):
        print(f"{label:<30}{r['HF']:>10{fmt}}{r['ours']:>10{fmt}}{r['ratio']:>9.3f}{r['paired']:>9.3f}")
    gflops = {name: flops_per_token * train[name] / 1e9 for name in ("HF", "ours")}
    print(f"{'train step, GFLOP/s':<30}{gflops['HF']:>10.1f}{gflops['ours']:>10.1f}")
    label = "train step, MFU" if args.device == "cuda" else "train step, of matmul peak"
    print(f"{label:<30}{gflops['HF'] * 1e9 / peak:>10.1%}{gflops['ours'] * 1e9 / peak:>10.1%}")
    print(f"\nmatmul peak ({args.dtype} torch.mm 2048^3, best of 20): {peak / 1e9:.1f} GFLOP/s; "
          f"training FLOPs/token at T={args.seq_len} (flops_per_token): {flops_per_token / 1e6:.1f} M")
    print("generated tokens: identical" if same_tokens else "WARNING: HF and ours generated different tokens")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda was asked for but torch.cuda.is_available() is False; use --device cpu")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_model()
    print(f"date {datetime.datetime.now():%Y-%m-%d %H:%M}  torch {torch.__version__}  "
          f"transformers {transformers.__version__}  threads {torch.get_num_threads()}")
    print(f"device {args.device}: {device_name}")
    print(f"model: hidden {args.hidden_size}, layers {args.layers}, heads {args.heads}/{args.kv_heads} kv, "
          f"intermediate {args.intermediate_size}, vocab {args.vocab_size}, {args.dtype}")
    print(f"train: batch {args.batch_size} x {args.seq_len}; generate: {args.gen_batch_size} prompts x "
          f"{args.prompt_len} + {args.new_tokens} new; {args.warmup} warmup + {args.steps} timed repeats")

    hf, ours = build_models(args)
    diff = logits_max_diff(hf, ours, args)
    print(f"parameters: {ours.num_parameters() / 1e6:.1f} M; max |logits HF - ours|: {diff:.2e}")
    if diff > (1e-4 if args.dtype == "float32" else 5e-2):
        print("WARNING: the converted model's logits differ from Hugging Face's")
    peak = matmul_peak_flops(DTYPES[args.dtype], args.device)
    generation, same_tokens = bench_generation(hf, ours, args)
    train = bench_training(hf, ours, args)
    peak = max(peak, matmul_peak_flops(DTYPES[args.dtype], args.device))  # before and after: dodge a busy moment
    report(args, train, generation, same_tokens, peak, ours.flops_per_token(args.seq_len))


if __name__ == "__main__":
    main()
