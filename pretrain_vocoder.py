"""Train a mel → waveform vocoder on cached speech, in one process or under DeepSpeed, optionally as a GAN.

    python preprocess_vocoder_dataset.py --dataset_name builtin:speech --split train \\
        --output_dir cached_datasets/librispeech_train_vocoder_cached       # or LibriSpeech from the hub
    python preprocess_vocoder_dataset.py --dataset_name builtin:speech --split validation \\
        --output_dir cached_datasets/librispeech_val_vocoder_cached
    python pretrain_vocoder.py --run_name vocoder_run --vocoder_type tiny_lightheaded_freq_domain_vocoder \\
        --train_data_dir cached_datasets/librispeech_train_vocoder_cached \\
        --val_data_dir cached_datasets/librispeech_val_vocoder_cached
    deepspeed --num_gpus=2 pretrain_vocoder.py --use_deepspeed --bf16 --run_name vocoder_gan \\
        --vocoder_type small_freq_domain_vocoder --use_gan --gan_start_step 10000

--vocoder_type (or --config) names configs/vocoder/*.yaml (or a YAML path); --set KEY=VALUE and the
--*_loss_weight flags override its fields (the run's config.yaml records the result). Training crops random
windows of --segment_frames mel frames with the audio they generate. --use_gan trains the config's
discriminators from --gan_start_step on, at --discriminator_lr. Defaults follow Vocos (AdamW, lr 5e-4,
betas 0.8/0.9). Logged: every loss term (train/mel_l1, train/stft_*, train/phase_*, train/reconstruction, with
a GAN train/adversarial, train/feature_matching, train/discriminator/loss, logits_real, logits_fake),
train/audio_seconds_per_sec, eval/mel_l1 and eval/mrstft on whole validation clips, and every
--generation_steps ground-truth and generated audio of a few validation clips with their mel spectrograms.
Then: vocode.py --run_dir runs/RUN_NAME --input in.wav --output out.wav, evaluate_vocoder.py --run_dir ...
"""

import sys

from data.vocoder_cache import open_vocoder_caches
from model.audio.vocoders.config import VocoderConfig
from model.audio.vocoders.vocoders import VocoderWithLoss, build_vocoder
from training.arguments import build_parser, check_arguments
from training.cli import finished_line, run_training
from training.vocoder_task import build_vocoder_task

LOSS_WEIGHTS = ("mel_loss_weight", "stft_loss_weight", "phase_loss_weight", "adversarial_loss_weight",
                "feature_matching_loss_weight")


def parse_args(argv=None):
    parser = build_parser(__doc__)
    parser.set_defaults(max_steps=100_000, learning_rate=5e-4, adam_beta1=0.8, adam_beta2=0.9, weight_decay=0.01,
                        eval_steps=500, save_steps=1000)
    parser.add_argument("--vocoder_type", "--config", dest="vocoder_type",
                        default="tiny_lightheaded_freq_domain_vocoder",
                        help="config name in configs/vocoder/ or a YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--train_data_dir", default="cached_datasets/librispeech_train_vocoder_cached",
                        help="written by preprocess_vocoder_dataset.py --split train")
    parser.add_argument("--val_data_dir", default="cached_datasets/librispeech_val_vocoder_cached",
                        help="written by preprocess_vocoder_dataset.py --split validation")
    parser.add_argument("--segment_frames", type=int, default=32,
                        help="mel frames per training crop ((frames - 1) * hop_length samples: 8192 at hop 256)")
    weights = parser.add_argument_group("loss weights (default: the config's)")
    for name in LOSS_WEIGHTS:
        weights.add_argument(f"--{name}", type=float)
    gan = parser.add_argument_group("adversarial training")
    gan.add_argument("--use_gan", action="store_true", help="train the config's discriminators against the vocoder")
    gan.add_argument("--gan_start_step", type=int, default=0, help="optimizer step at which the discriminators start")
    gan.add_argument("--discriminator_lr", type=float, help="peak learning rate of the discriminators "
                                                           "(default: --learning_rate)")
    samples = parser.add_argument_group("samples")
    samples.add_argument("--generation_steps", type=int, help="audio samples every N steps (default: --eval_steps)")
    samples.add_argument("--sample_clips", type=int, default=3, help="validation clips heard in TensorBoard")
    args = parser.parse_args(argv)
    if args.discriminator_lr is None:
        args.discriminator_lr = args.learning_rate
    return args


def check_vocoder_arguments(args) -> None:
    check_arguments(args)
    if args.discriminator_lr <= 0:
        raise ValueError(f"--discriminator_lr must be positive, got {args.discriminator_lr}")
    if args.gan_start_step < 0:
        raise ValueError(f"--gan_start_step must not be negative, got {args.gan_start_step}")
    for name in ("sample_clips", "generation_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")


def resolve_config(args) -> VocoderConfig:
    """The named config with --set overrides and the loss-weight flags (recorded in the run's config.yaml)."""
    weights = [f"{name}={getattr(args, name)}" for name in LOSS_WEIGHTS if getattr(args, name) is not None]
    return VocoderConfig.from_name(args.vocoder_type).with_overrides(args.set + weights)


def prepare(args):
    """The vocoder task builder and the closing report (training/cli.py)."""
    check_vocoder_arguments(args)
    config = resolve_config(args)
    train_cache, val_cache = open_vocoder_caches(args.train_data_dir, args.val_data_dir, config)

    def build_task(context):
        return build_vocoder_task(VocoderWithLoss(build_vocoder(config)), train_cache, val_cache, args, context)

    def report(summary: dict) -> str:
        seconds = summary["tokens"]
        lines = [finished_line(summary, f"{seconds:,.0f} s = {seconds / 3600:.2f} h of audio seen",
                               f"discriminators from step {args.gan_start_step}" if args.use_gan else "")]
        if "eval/mel_l1" in summary:
            lines.append(f"validation: mel L1 {summary['eval/mel_l1']:.4f}, "
                         f"multi-resolution STFT {summary['eval/mrstft']:.4f}")
        lines.append(f"listen:     python vocode.py --run_dir {summary['run_dir']} --input speech.wav "
                     "--output vocoded.wav")
        lines.append(f"evaluate:   python evaluate_vocoder.py --run_dir {summary['run_dir']} "
                     f"--data_dir {args.val_data_dir}")
        return "\n".join(lines)

    return build_task, report


def main(argv=None) -> int:
    return run_training(argv, parse_args, prepare)


if __name__ == "__main__":
    sys.exit(main())
