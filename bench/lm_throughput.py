"""Throughput of MegaTransformerCausalLM against Hugging Face's LlamaForCausalLM with the same weights.

    python bench/lm_throughput.py                     # defaults: ~30M-parameter Llama, float32, CPU
    python bench/lm_throughput.py --compile           # + torch.compile'd variants of both
    python bench/lm_throughput.py --config tiny --compile
    python bench/lm_throughput.py --device cuda --dtype bfloat16 --config modern_medium --seq-len 2048 --compile

Builds a Llama-style model from a LlamaConfig (or from one of our Llama-style configs, `--config`), converts it
with `convert_hf_model`, checks that the logits agree, then times in one process, alternating the variants in
each repeat (after warmup):

1. a training step: forward with labels, backward, AdamW step (a fresh AdamW per variant) → tokens/s;
   variants HF, ours and, with --compile, ours compiled (`nn.Module.compile`, as --torch_compile does);
2. greedy generation of exactly N new tokens from a batch of prompts → new tokens/s; variants HF (its default
   DynamicCache), ours (growing KV cache) and, with --compile, HF static cache + compile (`cache_implementation=
   "static"` with its CompileConfig) and ours compiled (`generate(compile=True)`: static cache, compiled step).
   Every variant must generate the same tokens as HF's default.

Rates come from the median time, with the ratio to HF's eager default (> 1: faster) of the medians and the
"paired" ratio: the median of the per-repeat ratios, steadier on a shared machine whose speed drifts. A
compiled variant's first call (which compiles) is timed apart: "first call" and the rate over the first call
plus the timed repeats ("incl. compile") show what compilation costs. The training step's achieved FLOP/s (our
`flops_per_token`, the same count for every variant) is compared with a measured matmul peak (MFU on CUDA,
against the GPU's bf16 dense peak as well when it is known).
A benchmark, not a test: nothing here is asserted by the test suite.
"""

import argparse
import copy
import datetime
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.generation.configuration_utils import CompileConfig  # noqa: E402

from bench.common import DTYPES, add_speed_arguments, interleaved_times, start_speed_run, timed  # noqa: E402
from megatransformer_utils import MegaTransformerConfig  # noqa: E402
from model.hf_conversion import convert_hf_model  # noqa: E402
from training.monitor import gpu_peak_flops  # noqa: E402

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="take the shape from one of our Llama-style configs (tiny, modern_small, "
                                     "modern_medium...) instead of the size flags below")
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
    add_speed_arguments(p, steps=10)
    p.add_argument("--compile", action="store_true", help="add the torch.compile'd variants")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.config:
        apply_config_shape(args)
    return args


def apply_config_shape(args) -> None:
    """Set the size flags from our config args.config, refusing configs a LlamaForCausalLM cannot mirror."""
    c = MegaTransformerConfig.from_name(args.config)
    llama_like = (c.norm_type == "rmsnorm" and c.use_rotary_embedding and c.intermediate_activation == "swiglu"
                  and c.ffn_type == "mlp" and not c.use_qkv_bias and not c.use_ffn_bias and c.rotary_dim == c.d_queries
                  and c.d_queries == c.d_values == c.hidden_size // c.n_heads and c.sliding_window is None)
    if not llama_like:
        sys.exit(f"--config {args.config} is not Llama-shaped (RMSNorm, full rotary, SwiGLU, no biases, no window)")
    args.hidden_size, args.layers, args.heads, args.kv_heads = c.hidden_size, c.n_layers, c.n_heads, c.n_query_groups
    args.intermediate_size, args.vocab_size = c.intermediate_size, c.vocab_size


def cpu_flags() -> str:
    """Which wide-vector and matrix extensions /proc/cpuinfo lists (they decide CPU matmul and compile speed)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "flags unknown"
    present = set(flags.split(":", 1)[1].split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return "flags: " + " ".join(f"{flag}{'+' if flag in present else '-'}" for flag in wanted)


def summarize(work: float, times: dict, first_calls: dict) -> dict:
    """{variant: {"rate", "ratio", "paired", "first", "with_compile"}}: rate = work / median seconds; ratio and
    paired compare with "HF" (the ratio of the medians, and the median over repeats of HF's time / the variant's
    in the same repeat, which cancels slow drift in machine speed that the ratio of medians does not);
    first = seconds of the compiling first call of a compiled variant, and with_compile the rate over that call
    plus the timed repeats."""
    hf = times["HF"]
    result = {}
    for name, t in times.items():
        rate = work / statistics.median(t)
        first = first_calls.get(name)
        result[name] = {"rate": rate, "paired": statistics.median(h / x for h, x in zip(hf, t)), "first": first,
                        "with_compile": work * (len(t) + 1) / (first + sum(t)) if first is not None else None}
    for name in result:
        result[name]["ratio"] = result[name]["rate"] / result["HF"]["rate"]
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


def train_step_fn(model, batch: torch.Tensor, compile: bool = False):
    """A function running one forward (with labels) + backward + AdamW step on a private copy of model
    (compiled in place with `nn.Module.compile`, as the training loop's --torch_compile does)."""
    model = copy.deepcopy(model).train()
    if compile:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step():
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def run_variants(fns: dict, compiled: tuple, work: float, args) -> dict:
    """Time fns (name → callable): each compiled variant's first call apart, then all interleaved."""
    first_calls = {name: timed(fns[name], args.device) for name in compiled}
    return summarize(work, interleaved_times(fns, args.warmup, args.steps, args.device), first_calls)


def bench_training(hf, ours, args) -> dict:
    """Tokens/s of a full training step for each variant."""
    batch = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=args.device)
    fns = {"HF": train_step_fn(hf, batch), "ours": train_step_fn(ours, batch)}
    if args.compile:
        fns["ours compiled"] = train_step_fn(ours, batch, compile=True)
    return run_variants(fns, ("ours compiled",) if args.compile else (), batch.numel(), args)


def bench_generation(hf, ours, args) -> tuple[dict, list]:
    """New tokens/s of greedy generation for each variant, and the variants whose tokens differ from HF's."""
    prompts = torch.randint(0, args.vocab_size, (args.gen_batch_size, args.prompt_len), device=args.device)
    mask = torch.ones_like(prompts)
    hf.generation_config.eos_token_id = None  # greedy for exactly N tokens, as ours with eos_token_id=None
    hf.generation_config.pad_token_id = 0
    n = args.new_tokens
    outputs = {}
    # HF compiles its decode step only on accelerators unless told to; on CPU "reduce-overhead" (CUDA graphs)
    # has no meaning, so the CPU run uses Inductor's default mode
    compile_config = CompileConfig(mode="reduce-overhead" if args.device == "cuda" else "default")
    compile_config._compile_all_devices = True

    def hf_fn(name, **kwargs):
        def run():
            outputs[name] = hf.generate(prompts, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                        min_new_tokens=n, **kwargs)
        return run

    def ours_fn(name, **kwargs):
        def run():
            outputs[name] = ours.generate(prompts, attention_mask=mask, max_new_tokens=n, eos_token_id=None, **kwargs)
        return run

    fns = {"HF": hf_fn("HF"), "ours": ours_fn("ours")}
    compiled = ()
    if args.compile:
        fns["HF static+compile"] = hf_fn("HF static+compile", cache_implementation="static",
                                         compile_config=compile_config)
        fns["ours compiled"] = ours_fn("ours compiled", compile=True)
        compiled = ("HF static+compile", "ours compiled")
    result = run_variants(fns, compiled, prompts.shape[0] * n, args)
    return result, [name for name in outputs if not torch.equal(outputs[name], outputs["HF"])]


def print_table(title: str, result: dict, fmt: str) -> None:
    print(f"\n{title:<30}{'rate':>10}{'x HF':>8}{'paired':>8}{'first call s':>14}{'incl. compile':>15}")
    for name, r in result.items():
        first = f"{r['first']:>14.1f}" if r["first"] is not None else f"{'':>14}"
        with_compile = f"{r['with_compile']:>15{fmt}}" if r["with_compile"] is not None else ""
        print(f"{'  ' + name:<30}{r['rate']:>10{fmt}}{r['ratio']:>8.3f}{r['paired']:>8.3f}{first}{with_compile}")


def report(args, train: dict, peak: float, flops_per_token: float) -> None:
    """train: summarize() results. Ratios are variant/HF (> 1: faster than HF)."""
    print_table(f"train step, tokens/s (median of {args.steps})", train, ".0f")
    gflops = {name: flops_per_token * r["rate"] / 1e9 for name, r in train.items()}
    print("train step, GFLOP/s: " + ", ".join(f"{name} {value:.1f}" for name, value in gflops.items()))
    label = "MFU vs measured matmul peak" if args.device == "cuda" else "fraction of matmul peak"
    print(f"train step, {label}: " + ", ".join(f"{name} {value * 1e9 / peak:.1%}" for name, value in gflops.items()))
    spec_peak = gpu_peak_flops(torch.device(args.device)) if args.device == "cuda" and args.dtype == "bfloat16" else None
    if spec_peak:
        print("train step, MFU vs the GPU's bf16 dense peak ({:.0f} TFLOP/s): ".format(spec_peak / 1e12) +
              ", ".join(f"{name} {value * 1e9 / spec_peak:.1%}" for name, value in gflops.items()))
    print(f"matmul peak ({args.dtype} torch.mm 2048^3, best of 10): {peak / 1e9:.1f} GFLOP/s; "
          f"training FLOPs/token at T={args.seq_len} (flops_per_token): {flops_per_token / 1e6:.1f} M")


def main(argv=None) -> None:
    args = parse_args(argv)
    device_name = start_speed_run(args)
    print(f"date {datetime.datetime.now():%Y-%m-%d %H:%M}  torch {torch.__version__}  "
          f"transformers {transformers.__version__}  threads {torch.get_num_threads()}")
    print(f"device {args.device}: {device_name}" + (f" ({cpu_flags()})" if args.device == "cpu" else ""))
    print(f"model{' ' + args.config if args.config else ''}: hidden {args.hidden_size}, layers {args.layers}, heads "
          f"{args.heads}/{args.kv_heads} kv, intermediate {args.intermediate_size}, vocab {args.vocab_size}, {args.dtype}")
    print(f"train: batch {args.batch_size} x {args.seq_len}; generate: {args.gen_batch_size} prompts x "
          f"{args.prompt_len} + {args.new_tokens} new; {args.warmup} warmup + {args.steps} timed repeats")

    hf, ours = build_models(args)
    diff = logits_max_diff(hf, ours, args)
    print(f"parameters: {ours.num_parameters() / 1e6:.1f} M; max |logits HF - ours|: {diff:.2e}")
    if diff > (1e-4 if args.dtype == "float32" else 5e-2):
        print("WARNING: the converted model's logits differ from Hugging Face's")
    peak = matmul_peak_flops(DTYPES[args.dtype], args.device)
    if not args.skip_generation:
        generation, differing = bench_generation(hf, ours, args)
        print_table(f"generation, new tokens/s (median of {args.steps})", generation, ".1f")
        print("generated tokens: every variant equals HF's default" if not differing else
              f"WARNING: {', '.join(differing)} generated other tokens than HF's default")
    if not args.skip_training:
        train = bench_training(hf, ours, args)
        peak = max(peak, matmul_peak_flops(DTYPES[args.dtype], args.device))  # before and after: dodge a busy moment
        report(args, train, peak, ours.flops_per_token(args.seq_len))


if __name__ == "__main__":
    main()
