"""The audio-VAE task for the shared loop: fixed-length mel crops of cached utterances with their speaker
embeddings, LDM's VAE loss (L1/MSE + KL [+ hinge GAN with the adaptive weight]) on the log-mel, the PatchGAN as the
loop's adversary, validation reconstruction metrics, mel images and (with a vocoder) audio of fixed clips.

    train_cache, val_cache = open_utterance_caches(train_dir, val_dir)
    task = build_audio_vae_task(build_audio_vae(config), config, train_cache, val_cache, vocoder, args, context)

Micro-batch i crops each utterance at an offset drawn from a generator seeded by (seed, rank, i) (a resumed run
reads the same crops); shorter utterances are padded with silence (the config's pad_value). The model sees raw
log-mels in the dtype of its weights; losses and metrics are float32.
"""

import logging
import math

import torch
from torch import nn

from data.audio_diffusion_batches import crop_or_pad_mels
from data.cached_batches import CachedBatches, fixed_items
from data.sharded_cache import ShardedCache
from model.audio.vae import AudioVAE, AudioVAEConfig
from model.image.discriminators import PatchGANDiscriminator
from model.vae import VAELoss
from training.audio_samples import mel_image
from training.loop import evaluate_means
from training.task import Adversary, Audio, Image, LossTerms, TrainingTask

logger = logging.getLogger(__name__)


def _parameter_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def micro_batch_seed(seed: int, rank: int, index: int) -> int:
    """The crop generator's seed of micro-batch `index` of `rank`: a pure function of its arguments."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + index) % 2 ** 63


def segment_frames(requested: int, config: AudioVAEConfig) -> int:
    """--segment_frames rounded up to a multiple of the VAE's time downsampling r."""
    r = config.time_downsample
    return -(-requested // r) * r


class MelDiscriminator(nn.Module):
    """The image PatchGAN on the normalised log-mel: mel (B, 1, n_mels, T) -> logits (B, 1, h, w)."""

    def __init__(self, config: AudioVAEConfig):
        super().__init__()
        self.config = config
        self.patchgan = PatchGANDiscriminator(1, config.disc_channels, config.disc_layers)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.patchgan((mel - self.config.mel_mean) / self.config.mel_std)


def _generator_terms(vae_loss: VAELoss, model: AudioVAE, target: torch.Tensor, reconstruction: torch.Tensor,
                     last_input: torch.Tensor, posterior, step: int, discriminator) -> tuple[dict, torch.Tensor]:
    """VAELoss.generator_loss on `twin`, the decoder's last convolution applied again to its input (the same values
    and gradients), so that the adaptive weight's autograd.grad does not pass through the tensors DeepSpeed's engine
    returned; see training/image_vae_task.py's _generator_terms for why. reconstruction joins with weight 0."""
    config = model.config
    twin = (model.decoder.conv_out(last_input) * config.mel_std + config.mel_mean)[..., :target.shape[-1]]
    terms = vae_loss.generator_loss(target, twin, posterior, step, model.last_layer, discriminator)
    return terms, terms["loss"] + 0.0 * reconstruction.float().mean()


def build_audio_vae_loss(config: AudioVAEConfig) -> VAELoss:
    return VAELoss(reconstruction=config.reconstruction_loss, kl_weight=config.kl_weight,
                   disc_weight=config.disc_weight, disc_start_step=config.disc_start_step,
                   adaptive_weight_max=config.adaptive_weight_max)


def build_audio_vae_task(model: AudioVAE, config: AudioVAEConfig, train_cache: ShardedCache, val_cache: ShardedCache,
                         vocoder, args, context) -> TrainingTask:
    """The TrainingTask (with the PatchGAN as its adversary when config.use_discriminator).

    args: batch_size, seed, eval_batches, eval_steps, generation_steps (default eval_steps), segment_frames,
    sample_clips, discriminator_lr. vocoder: None, or a vocoder (model/audio/vocoders) for the audio samples."""
    frames = segment_frames(args.segment_frames, config)
    device, pad = context.device, config.pad_value

    def collate(items: list[dict]) -> dict:
        return crop_or_pad_mels(items, frames, pad, None)

    train = CachedBatches(train_cache, args.batch_size, args.seed, context.rank, context.world_size, lambda x: x)
    val_items = fixed_items(val_cache, args.eval_batches * args.batch_size)
    val = [collate(val_items[start:start + args.batch_size]) for start in range(0, len(val_items), args.batch_size)]
    sample_items = val_items[:args.sample_clips]
    vae_loss = build_audio_vae_loss(config)
    logged = ["reconstruction", "kl"] + (["adversarial", "adaptive_weight"] if config.use_discriminator else [])
    features = train_cache.meta["features"]

    def train_batch(i: int) -> dict:
        generator = torch.Generator().manual_seed(micro_batch_seed(args.seed, context.rank, i))
        return crop_or_pad_mels(train.batch(i), frames, pad, generator)

    def loss(forward, batch: dict, step: int, discriminator=None) -> LossTerms:
        """batch: mel (B, 1, n_mels, frames), speaker_embedding (B, S); discriminator: None or the frozen PatchGAN."""
        dtype = _parameter_dtype(model)
        last = model.decoder.conv_out
        captured = {}
        handle = last.register_forward_hook(lambda module, inputs, output: captured.__setitem__("input", inputs[0]))
        try:
            reconstruction, posterior = forward(batch["mel"].to(dtype), batch["speaker_embedding"].to(dtype))
        finally:
            handle.remove()
        terms, total = _generator_terms(vae_loss, model, batch["mel"], reconstruction, captured["input"], posterior,
                                        step, discriminator)
        return LossTerms(total, logs={name: terms[name] for name in logged}, outputs={"reconstruction": reconstruction})

    def discriminator_loss(discriminator, batch: dict, outputs: dict) -> LossTerms:
        terms = vae_loss.discriminator_loss(batch["mel"], outputs["reconstruction"], vae_loss.disc_start_step,
                                            discriminator)
        return LossTerms(terms["loss"], logs={"logits_real": terms["logits_real"],
                                              "logits_fake": terms["logits_fake"]})

    def measure(eval_model, batch: dict) -> dict:
        """L1 and MSE of the log-mel, decoding the posterior mean; the KL per input element."""
        dtype = _parameter_dtype(eval_model)
        reconstruction, posterior = eval_model(batch["mel"].to(dtype), batch["speaker_embedding"].to(dtype),
                                               sample_posterior=False)
        error = reconstruction.float() - batch["mel"]
        return {"mel_l1": error.abs().mean(), "mel_mse": error.square().mean(),
                "kl": posterior.kl().mean() / batch["mel"][0].numel()}

    def evaluate(eval_model) -> dict:
        return {f"eval/{name}": value for name, value in evaluate_means(eval_model, val, measure, device).items()}

    @torch.no_grad()
    def samples(eval_model) -> dict:
        was_training = eval_model.training
        eval_model.eval()
        logged_samples, floor = {}, math.log(features["log_floor"])
        dtype = _parameter_dtype(eval_model)
        for index, item in enumerate(sample_items):
            mel = item["mel"].float().to(device)
            speaker = item["speaker_embedding"].float().to(device)[None]
            reconstruction = eval_model(mel[None, None].to(dtype), speaker.to(dtype), sample_posterior=False)[0]
            reconstruction = reconstruction[0, 0].float()
            prefix = f"samples/clip{index}"
            logged_samples[f"{prefix}/mel"] = Image(mel_image([mel.cpu(), reconstruction.cpu()], floor))
            if vocoder is not None:
                pair = torch.stack([mel, reconstruction])
                original, decoded = vocoder(pair)[0].float().cpu()
                logged_samples[f"{prefix}/vocoded_original"] = Audio(original, features["sample_rate"])
                logged_samples[f"{prefix}/vocoded_reconstruction"] = Audio(decoded, features["sample_rate"])
        eval_model.train(was_training)
        return logged_samples

    adversary = None
    if config.use_discriminator:
        adversary = Adversary(module=MelDiscriminator(config), loss=discriminator_loss,
                              start_step=config.disc_start_step, learning_rate=args.discriminator_lr,
                              name="discriminator")
    logger.info("audio VAE: %d train utterances (%d batches of %d-frame crops per epoch per rank), %d validation",
                len(train_cache), train.batches_per_epoch, frames, len(val_items))
    seconds_per_frame = features["hop_length"] / features["sample_rate"]
    return TrainingTask(model=model, config=config, train_batch=train_batch, loss=loss,
                        batch_size=lambda batch: batch["mel"].shape[0] * batch["mel"].shape[-1] * seconds_per_frame,
                        throughput_unit="audio_seconds", evaluate=evaluate, samples=samples,
                        generation_steps=args.generation_steps or args.eval_steps, adversary=adversary)
