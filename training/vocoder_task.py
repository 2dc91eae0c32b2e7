"""The vocoder task for the shared loop: random aligned mel/waveform crops from a vocoder cache, the
reconstruction losses of VocoderWithLoss (plus feature matching and adversarial terms once the discriminator has
started), validation mel L1 and multi-resolution STFT distance on whole clips, and audio + spectrogram samples.

    train_cache, val_cache = open_vocoder_caches(train_dir, val_dir, config)   # data/vocoder_cache.py
    model = VocoderWithLoss(build_vocoder(config))      # what trains and what checkpoints hold (model/families.py)
    task = build_vocoder_task(model, train_cache, val_cache, args, context)

The crops are data/vocoder_cache.py's SegmentBatches; the metrics are training/audio_metrics.py's. The model
sees the mel in the dtype of its weights (DeepSpeed's bf16 makes them bfloat16 and the loop does not cast
batches); waveforms, losses and metrics stay float32.
"""

import logging
import math

import torch

from data.cached_batches import fixed_items
from data.sharded_cache import ShardedCache
from data.vocoder_cache import SegmentBatches
from model.audio.criteria import MultiResolutionSTFTLoss
from model.audio.features import log_mel, num_samples
from model.audio.vocoders.config import VocoderConfig
from model.audio.vocoders.vocoders import VocoderWithLoss, build_discriminator
from training.audio_metrics import min_metric_samples, reconstruction_metrics
from training.audio_samples import mel_image
from training.loop import evaluate_means
from training.task import Adversary, Audio, Image, LossTerms, TrainingTask

logger = logging.getLogger(__name__)


def min_segment_frames(model: VocoderWithLoss, use_gan: bool) -> int:
    """The fewest mel frames per crop whose (T - 1) * hop generated samples the losses (and the multi-resolution
    discriminator's STFTs, with use_gan) can take."""
    config = model.config
    needed = model.min_samples
    if use_gan and "mrd" in config.discriminators:
        needed = max(needed, max(config.mrd_fft_sizes) // 2 + 1)
    return math.ceil(needed / config.hop_length) + 1


def _long_enough(items: list, config: VocoderConfig, cache: ShardedCache) -> list:
    """The items whose generated audio reconstruction_metrics can take (the others are left out, with a warning)."""
    kept = [item for item in items if num_samples(item["mel"].shape[-1], config.features) >= min_metric_samples(config)]
    if not kept:
        raise ValueError(f"every validation clip of {cache.directory} is too short for the metrics (need "
                         f"{min_metric_samples(config)} samples): write it with a longer --min_segment_seconds")
    if len(kept) < len(items):
        logger.warning("%d of %d validation clips are too short for the metrics and left out",
                       len(items) - len(kept), len(items))
    return kept


def _parameter_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _mean_logits(logits: list) -> torch.Tensor:
    """The mean of each sub-discriminator's logits, averaged over the sub-discriminators."""
    return torch.stack([score.detach().float().mean() for score in logits]).mean()


def build_vocoder_task(model: VocoderWithLoss, train_cache: ShardedCache, val_cache: ShardedCache, args,
                       context) -> TrainingTask:
    """The TrainingTask (with the config's discriminators as the adversary when args.use_gan).

    args: batch_size, seed, segment_frames, eval_batches (validation clips, one per batch), eval_steps,
    generation_steps (default eval_steps), sample_clips, use_gan, gan_start_step, discriminator_lr."""
    config, features = model.config, model.config.features
    shortest = min_segment_frames(model, args.use_gan)
    if args.segment_frames < shortest:
        raise ValueError(f"--segment_frames {args.segment_frames} is too short: the losses of config '{config.name}' "
                         f"need at least {shortest} frames ({num_samples(shortest, features)} samples)")
    train = SegmentBatches(train_cache, args.batch_size, args.segment_frames, features, args.seed, context.rank,
                           context.world_size)
    val_items = _long_enough(fixed_items(val_cache, args.eval_batches), config, val_cache)
    val = [{"mel": item["mel"][None], "waveform": item["waveform"][None]} for item in val_items]
    sample_items = _long_enough(fixed_items(val_cache, args.sample_clips), config, val_cache)
    stft_loss = MultiResolutionSTFTLoss(config.stft_resolutions)

    def loss(forward, batch: dict, step: int, discriminator=None) -> LossTerms:
        """forward: the VocoderWithLoss (or DeepSpeed's engine around it); batch: see SegmentBatches;
        discriminator: None before the adversary's start step, else the frozen discriminator module (the loop's
        GAN protocol, training/task.py)."""
        waveform = batch["waveform"]
        output = forward(batch["mel"].to(_parameter_dtype(model)), waveform)
        reconstruction = output.losses["total"]
        logs = {"reconstruction": reconstruction,
                **{name: value for name, value in output.losses.items() if name != "total"}}
        total = reconstruction
        if discriminator is not None:
            real = discriminator(waveform[:, :output.waveform.shape[-1]])
            fake = discriminator(output.waveform)
            gan = model.generator_adversarial_loss(fake.logits, real.features, fake.features)
            total = total + gan["total"]
            logs.update(adversarial=gan["adversarial"], feature_matching=gan["feature_matching"])
        return LossTerms(total, logs=logs, outputs={"waveform": output.waveform})

    def discriminator_loss(discriminator, batch: dict, outputs: dict) -> LossTerms:
        fake_waveform = outputs["waveform"]
        real = discriminator(batch["waveform"][:, :fake_waveform.shape[-1]])
        fake = discriminator(fake_waveform)
        return LossTerms(model.discriminator_loss(real.logits, fake.logits),
                         logs={"logits_real": _mean_logits(real.logits), "logits_fake": _mean_logits(fake.logits)})

    def measure(eval_model, batch: dict) -> dict:
        generated, _ = eval_model.vocoder(batch["mel"].to(_parameter_dtype(eval_model)))
        return reconstruction_metrics(generated, batch["waveform"][:, :generated.shape[-1]], config, stft_loss)

    def evaluate(eval_model) -> dict:
        metrics = evaluate_means(eval_model, val, measure, context.device)
        return {f"eval/{name}": value for name, value in metrics.items()}

    @torch.no_grad()
    def samples(eval_model) -> dict:
        was_training = eval_model.training
        eval_model.eval()
        logged, floor = {}, math.log(config.log_floor)
        for index, item in enumerate(sample_items):
            mel = item["mel"].to(context.device)
            generated = eval_model.vocoder(mel[None].to(_parameter_dtype(eval_model)))[0][0].float().cpu()
            prefix = f"samples/clip{index}"
            logged[f"{prefix}/ground_truth"] = Audio(item["waveform"][:generated.shape[-1]], config.sample_rate)
            logged[f"{prefix}/generated"] = Audio(generated, config.sample_rate)
            logged[f"{prefix}/mel"] = Image(mel_image([item["mel"], log_mel(generated, features)], floor))
        eval_model.train(was_training)
        return logged

    adversary = None
    if args.use_gan:
        adversary = Adversary(module=build_discriminator(config), loss=discriminator_loss,
                              start_step=args.gan_start_step, learning_rate=args.discriminator_lr,
                              name="discriminator")
    logger.info("vocoder: %d train clips (%d batches of %d-frame crops per epoch per rank), %d validation clips",
                len(train_cache), train.items.batches_per_epoch, args.segment_frames, len(val))
    return TrainingTask(model=model, config=config, train_batch=train.batch, loss=loss,
                        batch_size=lambda batch: batch["waveform"].numel() / config.sample_rate,
                        throughput_unit="audio_seconds", evaluate=evaluate, samples=samples,
                        generation_steps=args.generation_steps or args.eval_steps, adversary=adversary)
