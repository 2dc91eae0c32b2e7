"""Pretrain a language model on a cached text dataset, in one process or under DeepSpeed.

    python preprocess_text_dataset.py --dataset_name builtin:text --train_tokenizer
    deepspeed --num_gpus=2 pretrain_wm.py --use_deepspeed --bf16 --run_name my_run_name \\
        --config gpt2_small --max_steps 300000 --gradient_accumulation_steps 8 \\
        --use_gradient_checkpointing --deepspeed_config ds_config_zero-2.json
    python pretrain_wm.py --run_name quick --config tiny --max_steps 200       # plain PyTorch, one process

The model family follows the config: a multimodal config (`multimodal/NAME`, a name found only in
configs/multimodal/, or a YAML file with media: several modalities or a non-text one) selects the multimodal world
model, trained on the interleaved caches of preprocess_multimodal_dataset.py (--train_data_dir, --val_data_dir; see
training/multimodal_task.py); otherwise model/families.py's select_family decides: a name containing `recurrent`
(or `model_family: recurrent`) selects the recurrent-depth LM, anything else the causal LM.

    python pretrain_wm.py --run_name wm --config multimodal/tiny --train_data_dir cached_datasets/wm_train \\
        --val_data_dir cached_datasets/wm_val --max_steps 2000
    python pretrain_wm.py --run_name wm_r --config multimodal/tiny_recurrent ...   # or --set backbone=recurrent

A multimodal run models the media its train cache holds (text, images, speech) and logs each loss term apart;
its samples are captions and image grids, transcripts and speech (--vocoder_checkpoint, or Griffin-Lim).

A recurrent run (the recurrent LM, or a multimodal config with backbone: recurrent) logs train/thinking_steps
and, at each evaluation, the validation loss at the depths of --eval_thinking_steps (and under the LM's exit
criterion, or at the world model's mean depth). The vocabulary size and special tokens follow the cache's
tokenizer. Everything lands in runs/RUN_NAME/.
"""

import sys

from data.text_cache import TextTokenCache
from megatransformer_utils import MegaTransformerConfig
from model import build_model
from model.families import select_family
from model.megatransformer_multimodal import is_multimodal_config
from training.arguments import build_parser, check_arguments
from training.language_modeling import DEFAULT_PROMPTS, build_lm_task
from training.multimodal_task import add_multimodal_arguments, prepare_multimodal
from training.cli import finished_line, run_training


def parse_args(argv=None):
    parser = build_parser(__doc__)
    parser.add_argument("--config", default="gpt2_small", help="config name in configs/ or a YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--data_dir", default="cached_datasets/text", help="written by preprocess_text_dataset.py")
    parser.add_argument("--seq_len", type=int, help="tokens per sequence (default: min(1024, max_position_embeddings))")
    parser.add_argument("--generation_steps", type=int, help="text samples every N steps (default: --eval_steps)")
    parser.add_argument("--sample_prompts", nargs="+", help="prompts for the text samples")
    parser.add_argument("--sample_max_new_tokens", type=int, default=48)
    parser.add_argument("--eval_thinking_steps", type=int, nargs="+", default=[1, 4, 16, 32], metavar="R",
                        help="recurrent models and recurrent world models: also evaluate at these fixed depths")
    add_multimodal_arguments(parser)
    return parser.parse_args(argv)


def resolve_config(args, cache) -> MegaTransformerConfig:
    """The named config with --set overrides, its vocabulary and special tokens taken from the cache."""
    config = MegaTransformerConfig.from_name(args.config).with_overrides(args.set)
    config = config.with_overrides([f"model_family={select_family(config)}"])
    tokens = {"vocab_size": cache.vocab_size, "eos_token_id": cache.eos_token_id,
              "bos_token_id": cache.bos_token_id, "pad_token_id": cache.pad_token_id}
    config = config.with_overrides([f"{key}={'null' if value is None else value}" for key, value in tokens.items()])
    args.seq_len = args.seq_len or min(1024, config.max_position_embeddings)
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq_len {args.seq_len} exceeds max_position_embeddings={config.max_position_embeddings} "
                         f"of config '{config.name}'")
    return config


def prepare(args):
    """The task builder and the closing report (training/cli.py)."""
    if is_multimodal_config(args.config):  # several modalities or a non-text one → multimodal
        return prepare_multimodal(args)
    args.sample_prompts = args.sample_prompts or list(DEFAULT_PROMPTS)
    check_arguments(args)
    if min(args.eval_thinking_steps) < 1:
        raise ValueError(f"--eval_thinking_steps must be at least 1, got {min(args.eval_thinking_steps)}")
    cache = TextTokenCache(args.data_dir)
    config = resolve_config(args, cache)

    def report(summary: dict) -> str:
        lines = [finished_line(summary, f"{summary['tokens']:,} tokens")]
        if "eval/loss" in summary:
            lines.append(f"validation loss {summary['eval/loss']:.4f} (perplexity {summary['eval/perplexity']:.1f})")
        depths = sorted((int(key.rsplit("_", 1)[1]), value) for key, value in summary.items()
                        if key.startswith("eval/loss_steps_"))
        if depths:
            lines.append("validation loss by thinking steps: " + ", ".join(f"{r}: {loss:.4f}" for r, loss in depths) +
                         f"; exit criterion used {summary['eval/mean_thinking_steps']:.1f} steps on average")
        if "samples/text" in summary:
            lines.append(f"\nsamples:\n{summary['samples/text']}")
        return "\n".join(lines)

    return (lambda context: build_lm_task(build_model(config), config, cache, args, context)), report


def main(argv=None) -> int:
    return run_training(argv, parse_args, prepare)


if __name__ == "__main__":
    sys.exit(main())
