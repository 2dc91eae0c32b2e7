"""Pretrain the audio VAE (log-mel -> latent -> log-mel, the decoder FiLM-conditioned on the speaker) on cached
utterances, in one process or under DeepSpeed.

    python pretrain_audio_vae.py --run_name audio_vae_run --config small --latent_channels 8 \\
        --speaker_embedding_dim 192 --train_cache_dir cached_datasets/librispeech_train_diffusion_cached \\
        --val_cache_dir cached_datasets/librispeech_val_diffusion_cached
    python pretrain_audio_vae.py --run_name phrases_vae --config small \\
        --train_cache_dir cached_datasets/phrases_train_diffusion_cached \\
        --val_cache_dir cached_datasets/phrases_val_diffusion_cached --vocoder_checkpoint runs/vocoder/checkpoint-XXX
(checkpoint-XXX: the step of the vocoder checkpoint that pretrain_vocoder.py wrote, e.g. checkpoint-1000.)
    deepspeed --num_gpus=2 pretrain_audio_vae.py --use_deepspeed --bf16 --run_name audio_vae_run ...

The caches come from preprocess_audio_diffusion_dataset.py. --config names configs/audio_vae/*.yaml (or a YAML
path); --set KEY=VALUE overrides a field, --latent_channels the latent channels. --speaker_embedding_dim, when
given, must equal the cache's speaker encoder width (default: taken from the cache). Training reads crops of
--segment_frames frames (rounded up to a multiple of the VAE's time downsampling; shorter utterances padded with
silence). A config with use_discriminator trains the PatchGAN on the log-mel from disc_start_step on.
Defaults: Adam betas (0.5, 0.9) without weight decay, learning rate 1e-4. Logged: train/reconstruction, kl,
(adversarial, adaptive_weight, discriminator/...); at each evaluation eval/mel_l1, eval/mel_mse, eval/kl on fixed
validation crops; every --generation_steps the mel of --sample_clips validation utterances above its
reconstruction, and with --vocoder_checkpoint both vocoded. Everything lands in runs/RUN_NAME/.
"""

import sys

from data.audio_diffusion_batches import check_speaker_embedding_dim, open_utterance_caches
from model.audio.vae import AudioVAEConfig, build_audio_vae
from model.pretrained import load_pretrained
from training.arguments import build_parser, check_arguments
from training.audio_vae_task import build_audio_vae_task, segment_frames
from training.cli import finished_line, run_training

FEATURE_KEYS = ("sample_rate", "n_mels", "n_fft", "hop_length", "win_length", "f_min", "f_max")


def parse_args(argv=None):
    parser = build_parser(__doc__)
    parser.set_defaults(max_steps=50_000, learning_rate=1e-4, adam_beta1=0.5, adam_beta2=0.9, weight_decay=0.0,
                        eval_steps=500, save_steps=1000, batch_size=16)
    parser.add_argument("--config", default="small", help="config name in configs/audio_vae/ or a YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--latent_channels", type=int, help="latent channels C (default: the config's)")
    parser.add_argument("--speaker_embedding_dim", type=int,
                        help="width of the cached speaker embeddings (checked against the cache; default: the cache's)")
    parser.add_argument("--train_cache_dir", "--train_data_dir", dest="train_cache_dir",
                        default="cached_datasets/audio_train_diffusion_cached",
                        help="written by preprocess_audio_diffusion_dataset.py --split train")
    parser.add_argument("--val_cache_dir", "--val_data_dir", dest="val_cache_dir",
                        default="cached_datasets/audio_validation_diffusion_cached",
                        help="written by preprocess_audio_diffusion_dataset.py --split validation")
    parser.add_argument("--segment_frames", type=int, default=240, help="mel frames per training crop")
    parser.add_argument("--vocoder_checkpoint", help="a pretrain_vocoder.py checkpoint: vocoded samples in TensorBoard")
    parser.add_argument("--discriminator_lr", type=float, help="peak learning rate of the PatchGAN "
                                                               "(default: --learning_rate)")
    parser.add_argument("--disc_start_step", type=int,
                        help="optimizer step at which the GAN starts (default: the config's disc_start_step)")
    parser.add_argument("--generation_steps", type=int, help="samples every N steps (default: --eval_steps)")
    parser.add_argument("--sample_clips", type=int, default=4, help="validation utterances shown as samples")
    args = parser.parse_args(argv)
    args.discriminator_lr = args.discriminator_lr or args.learning_rate
    return args


def check_audio_vae_arguments(args) -> None:
    check_arguments(args)
    for name in ("segment_frames", "sample_clips", "generation_steps", "latent_channels", "speaker_embedding_dim"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.discriminator_lr <= 0:
        raise ValueError(f"--discriminator_lr must be positive, got {args.discriminator_lr}")
    if args.disc_start_step is not None and args.disc_start_step < 0:
        raise ValueError(f"--disc_start_step must not be negative, got {args.disc_start_step}")


def resolve_config(args, speaker_embedding_dim: int, n_mels: int) -> AudioVAEConfig:
    """The named config with --set, --latent_channels, --disc_start_step and the cache's speaker width and n_mels."""
    overrides = list(args.set) + [f"speaker_embedding_dim={speaker_embedding_dim}", f"n_mels={n_mels}"]
    if args.latent_channels is not None:
        overrides.append(f"latent_channels={args.latent_channels}")
    if args.disc_start_step is not None:
        overrides.append(f"disc_start_step={args.disc_start_step}")
    return AudioVAEConfig.from_name(args.config).with_overrides(overrides)


def load_matching_vocoder(directory, features: dict):
    """The vocoder of `directory`, checked to take the cache's mel features."""
    vocoder = load_pretrained(directory, family="vocoder")
    theirs = vocoder.features.to_dict()
    differ = [f"{key}: vocoder {theirs[key]}, cache {features[key]}" for key in FEATURE_KEYS
              if theirs[key] != features[key]]
    if differ:
        raise ValueError(f"the vocoder {directory} was trained on other mel features than the cache holds "
                         f"({'; '.join(differ)}): pass a vocoder trained on these features, or none")
    return vocoder


def prepare(args):
    """The audio VAE task builder and the closing report (training/cli.py)."""
    check_audio_vae_arguments(args)
    train_cache, val_cache = open_utterance_caches(args.train_cache_dir, args.val_cache_dir)
    speaker_dim = check_speaker_embedding_dim(train_cache, args.speaker_embedding_dim)
    features = train_cache.meta["features"]
    config = resolve_config(args, speaker_dim, features["n_mels"])
    vocoder = load_matching_vocoder(args.vocoder_checkpoint, features) if args.vocoder_checkpoint else None

    def build_task(context):
        return build_audio_vae_task(build_audio_vae(config), config, train_cache, val_cache,
                                    vocoder.to(context.device) if vocoder is not None else None, args, context)

    def report(summary: dict) -> str:
        frames = segment_frames(args.segment_frames, config)
        lines = [finished_line(summary, f"{summary['tokens']:,.0f} s of audio in {frames}-frame crops",
                               f"VAE '{config.name}', latent {config.latent_channels} x {config.latent_mels} x "
                               f"T/{config.time_downsample}")]
        if "eval/mel_l1" in summary:
            lines.append(f"validation: mel L1 {summary['eval/mel_l1']:.4f}, MSE {summary['eval/mel_mse']:.4f}, "
                         f"KL {summary['eval/kl']:.4f}")
        return "\n".join(lines)

    return build_task, report


def main(argv=None) -> int:
    return run_training(argv, parse_args, prepare)


if __name__ == "__main__":
    sys.exit(main())
