"""Pretrain a text-to-speech DiT (text and a speaker -> log-mel frames or audio-VAE latents) on cached utterances,
in one process or under DeepSpeed.

    python pretrain_audio_diffusion.py --run_name diffusion_run --diffusion_type small_dit \\
        --train_data_dir cached_datasets/librispeech_train_diffusion_cached \\
        --val_data_dir cached_datasets/librispeech_val_diffusion_cached
    python pretrain_audio_diffusion.py --run_name phrases_dit --diffusion_type tiny_dit \\
        --train_data_dir cached_datasets/phrases_train_diffusion_cached \\
        --val_data_dir cached_datasets/phrases_val_diffusion_cached \\
        --vae_checkpoint runs/phrases_vae/checkpoint-XXX --vocoder_checkpoint runs/vocoder/checkpoint-XXX
    python generate_audio.py --run_dir runs/phrases_dit --prompt "red box seven" --speaker ref.wav \\
        --vocoder_checkpoint runs/vocoder/checkpoint-XXX --output out.wav
(checkpoint-XXX: the step of the VAE and vocoder checkpoints that pretrain_audio_vae.py and pretrain_vocoder.py
wrote, e.g. checkpoint-1000.)

The caches come from preprocess_audio_diffusion_dataset.py. Without --vae_checkpoint the DiT denoises normalised
log-mel frames (the cache's mel_mean and mel_std); with one (a pretrain_audio_vae.py checkpoint) it denoises the
VAE's latents (posterior means scaled to unit variance, frequency rows stacked into channels), decoded with the
speaker: every train utterance and the validation ones used are encoded once at the start (each alone, its mel
padded with silence to whole patches; the time it took is logged) and kept in memory, so steps never run the
VAE encoder. --diffusion_type (or --config) names configs/audio_diffusion/*.yaml (or a YAML path); --set KEY=VALUE
overrides a field; the input width, text width and speaker width come from the data (an override that disagrees is
an error). Output length: generate_audio.py takes it from the user (--seconds) or, by default, from the number of
text tokens times the train cache's mel frames per token. Defaults follow DiT: AdamW at 1e-4 without weight decay,
betas (0.9, 0.999). Logged: train/loss, mse, loss_weight, cfg_dropped, speaker_dropped; eval/loss, eval/mse,
eval/ema_loss; every --generation_steps, for --sample_clips validation utterances (prompts held out of training),
the real mel above the generated one and, with --vocoder_checkpoint, both vocoded. Everything lands in
runs/RUN_NAME/.
"""

import sys

import yaml

from data.audio_diffusion_batches import check_speaker_embedding_dim, open_utterance_caches
from model.audio.diffusion import AudioDiffusionConfig, FrameCodec, build_audio_diffusion
from model.audio.pipeline import load_audio_vae_checkpoint
from model.pretrained import load_pretrained
from training.arguments import build_parser, check_arguments
from training.audio_diffusion_task import build_audio_diffusion_task
from training.cli import finished_line, run_training


def parse_args(argv=None):
    parser = build_parser(__doc__)
    parser.set_defaults(max_steps=100_000, learning_rate=1e-4, weight_decay=0.0, adam_beta2=0.999, eval_steps=1000,
                        save_steps=5000)
    parser.add_argument("--diffusion_type", "--config", dest="config", default="small_dit",
                        help="config name in configs/audio_diffusion/ or a YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--train_data_dir", "--train_cache_dir", dest="train_data_dir",
                        default="cached_datasets/audio_train_diffusion_cached",
                        help="written by preprocess_audio_diffusion_dataset.py --split train")
    parser.add_argument("--val_data_dir", "--val_cache_dir", dest="val_data_dir",
                        default="cached_datasets/audio_validation_diffusion_cached",
                        help="written by preprocess_audio_diffusion_dataset.py --split validation")
    parser.add_argument("--vae_checkpoint", help="a pretrain_audio_vae.py checkpoint: denoise its latents, "
                                                 "encoded once at the start (default: denoise mel frames)")
    parser.add_argument("--speaker_embedding_dim", type=int, help="checked against the cache (default: the cache's)")
    parser.add_argument("--vocoder_checkpoint", help="a pretrain_vocoder.py checkpoint: vocoded samples")
    parser.add_argument("--ema_decay", type=float, help="EMA decay of the weights (default: the config's ema_decay)")
    parser.add_argument("--generation_steps", type=int, help="samples every N steps (default: --eval_steps)")
    parser.add_argument("--sample_clips", type=int, default=2, help="validation utterances generated as samples")
    parser.add_argument("--sample_steps", type=int, help="sampler steps (default: the config's sampling_steps)")
    return parser.parse_args(argv)


def check_diffusion_arguments(args) -> None:
    check_arguments(args)
    for name in ("generation_steps", "sample_steps", "sample_clips", "speaker_embedding_dim"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.ema_decay is not None and not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in [0, 1), got {args.ema_decay}")


def resolve_config(args, data: dict) -> AudioDiffusionConfig:
    """The named config with --set overrides, --ema_decay and the widths `data` gives (ValueError if an override
    sets one of them to another value)."""
    for assignment in args.set:
        key, _, text = assignment.partition("=")
        key = key.strip()
        if key in data and yaml.safe_load(text) != data[key]:
            raise ValueError(f"--set {assignment.strip()} disagrees with the data, which give {key}={data[key]}: "
                             f"leave {key} out (it is taken from the cache and the VAE)")
    overrides = [f"{key}={value}" for key, value in data.items()] + list(args.set)
    if args.ema_decay is not None:
        overrides.append(f"ema_decay={args.ema_decay}")
    return AudioDiffusionConfig.from_name(args.config).with_overrides(overrides)


def prepare(args):
    """The audio diffusion task builder and the closing report (training/cli.py)."""
    check_diffusion_arguments(args)
    train_cache, val_cache = open_utterance_caches(args.train_data_dir, args.val_data_dir)
    speaker_dim = check_speaker_embedding_dim(train_cache, args.speaker_embedding_dim)
    meta = train_cache.meta
    vae = None
    if args.vae_checkpoint:
        vae = load_audio_vae_checkpoint(args.vae_checkpoint)
        if vae.config.speaker_embedding_dim not in (0, speaker_dim):
            raise ValueError(f"the VAE {args.vae_checkpoint} decodes with {vae.config.speaker_embedding_dim}-dim "
                             f"speaker embeddings but the cache holds {speaker_dim}-dim ones: use caches written with "
                             "the speaker encoder the VAE was trained on")
    codec = FrameCodec("latent" if vae is not None else "mel", meta["mel_mean"], meta["mel_std"], vae)
    data = {"representation": codec.representation, "latent_channels": codec.channels(meta["features"]["n_mels"]),
            "text_embed_dim": meta["text_encoder"]["dim"], "speaker_embedding_dim": speaker_dim}
    config = resolve_config(args, data)
    if args.sample_steps is not None and args.sample_steps > config.num_train_timesteps:
        raise ValueError(f"--sample_steps must be at most num_train_timesteps={config.num_train_timesteps}")
    vocoder = load_pretrained(args.vocoder_checkpoint, family="vocoder") if args.vocoder_checkpoint else None

    def build_task(context):
        if vae is not None:
            vae.to(context.device)
        return build_audio_diffusion_task(build_audio_diffusion(config), config, train_cache, val_cache, codec,
                                          vocoder.to(context.device) if vocoder is not None else None, args, context)

    def report(summary: dict) -> str:
        lines = [finished_line(summary, f"{summary['tokens']:,.0f} s of audio",
                               f"DiT '{config.name}' over {codec.representation} frames of {config.latent_channels} "
                               "channels")]
        if "eval/loss" in summary:
            lines.append(f"validation loss {summary['eval/loss']:.4f} (EMA weights {summary['eval/ema_loss']:.4f}), "
                         f"mse {summary['eval/mse']:.4f}")
        lines.append(f"speech: python generate_audio.py --run_dir {summary['run_dir']} --prompt \"...\" "
                     "--speaker ref.wav --vocoder_checkpoint DIR --output out.wav")
        return "\n".join(lines)

    return build_task, report


def main(argv=None) -> int:
    return run_training(argv, parse_args, prepare)


if __name__ == "__main__":
    sys.exit(main())
