"""Generate text from a causal LM checkpoint (or, to try an architecture, a randomly initialised config).

    python generate_text.py --run_dir runs/my_run --prompt "Once upon a time"   # newest checkpoint, run's tokenizer
    python generate_text.py --run_dir runs/my_run --checkpoint checkpoint-1000 --prompt "Once upon a time"
    python generate_text.py --checkpoint runs/converted --tokenizer path/to/hf_tokenizer --prompt "Hi"
    python generate_text.py --config tiny --prompt "Hello"          # random weights: shows the machinery works
    python generate_text.py --run_dir runs/my_run --prompt "Hi" --compile     # static KV cache, compiled decode step

A run directory (written by pretrain_wm.py) holds its tokenizer; otherwise pass --tokenizer, or text is
encoded as raw UTF-8 bytes (token id = byte value), which any model with vocab_size >= 256 accepts.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from megatransformer_utils import MegaTransformerConfig
from model import build_model, load_pretrained
from model.generation import left_pad
from training.checkpoints import resolve_checkpoint


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255: a tokenizer that needs no files."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def load_tokenizer(name_or_path):
    if name_or_path is None:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as error:
        raise ValueError(f"could not load tokenizer '{name_or_path}' ({error}); with no hub access pass a local "
                         "directory written by a tokenizer's save_pretrained") from error


def resolve_sources(args) -> None:
    """Fill args.checkpoint and args.tokenizer from --run_dir; exactly one of a checkpoint or --config is used."""
    if args.run_dir:
        run_dir = Path(args.run_dir)
        if args.checkpoint and not Path(args.checkpoint).is_dir():
            args.checkpoint = str(run_dir / args.checkpoint)
        args.checkpoint = args.checkpoint or str(resolve_checkpoint("latest", run_dir))
        if args.tokenizer is None and (run_dir / "tokenizer").is_dir():
            args.tokenizer = str(run_dir / "tokenizer")
    if bool(args.checkpoint) == bool(args.config):
        raise ValueError("give one model: --run_dir, --checkpoint, or --config (random weights)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", help="a training run: its newest checkpoint (or --checkpoint) and its tokenizer")
    parser.add_argument("--checkpoint", help="checkpoint directory (config.yaml + model.safetensors), or its name "
                                             "inside --run_dir")
    parser.add_argument("--config", help="config name or YAML path: builds a randomly initialised model")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--tokenizer", help="Hugging Face tokenizer name or local path (default: UTF-8 bytes)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--do_sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int)
    parser.add_argument("--top_p", type=float)
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true",
                        help="decode on a static KV cache with a torch.compile'd one-token step: the same tokens, "
                             "faster per token once compiled (the first call compiles: seconds to minutes)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    try:
        resolve_sources(args)
        tokenizer = load_tokenizer(args.tokenizer)
        if args.checkpoint:
            model = load_pretrained(args.checkpoint, device=args.device)
        else:
            model = build_model(MegaTransformerConfig.from_name(args.config).with_overrides(args.set)).to(args.device).eval()
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    config = model.config
    if isinstance(tokenizer, ByteTokenizer) and config.vocab_size < 256:
        print(f"error: byte-level text needs vocab_size >= 256, the model has {config.vocab_size}", file=sys.stderr)
        return 1

    encoded = [tokenizer.encode(prompt) for prompt in args.prompt]
    input_ids, attention_mask = left_pad(encoded, config.pad_token_id, args.device)
    longest = input_ids.shape[1]

    print(f"model: {config.name} ({config.model_family}), {model.num_parameters() / 1e6:.2f}M parameters, "
          f"{model.flops_per_token(longest + args.max_new_tokens, training=False) / 1e6:.1f} MFLOP/token"
          + ("" if args.checkpoint else ", random weights"))
    start = time.perf_counter()
    try:
        output = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=args.max_new_tokens,
                                do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                                compile=args.compile)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    new_tokens = output.shape[1] - longest
    for prompt, row in zip(args.prompt, output[:, longest:].tolist()):
        print(f"\n>>> {prompt}\n{tokenizer.decode(row)!r}")
    print(f"\n{new_tokens * len(encoded)} tokens in {seconds:.2f}s ({new_tokens * len(encoded) / seconds:.0f} tokens/s"
          + (", compilation included)" if args.compile else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
