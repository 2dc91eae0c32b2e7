"""The image-VAE task for the shared loop: batches of cached images, LDM's VAE loss (L1/MSE + KL [+ LPIPS]
[+ hinge GAN with the adaptive weight]), the PatchGAN as the loop's adversary, validation L1/PSNR/SSIM, and a
reconstruction grid as the image sample.

    train_cache, val_cache = open_image_caches(train_dir, val_dir, config)        # data/image_cache.py
    task = build_image_vae_task(build_image_vae(config), config, train_cache, val_cache, args, context)

Cached images are uint8 (3, H, W); the model sees them as floats in [-1, 1] in the dtype of its weights
(DeepSpeed's bf16 makes the weights bfloat16, and the loop does not cast batches); losses and metrics are float32.
"""

import contextlib
import logging

import torch
from torch import nn

from data.cached_batches import CachedBatches, fixed_items
from data.image_cache import stack_images
from data.sharded_cache import ShardedCache
from model.image.discriminators import build_discriminator
from model.image.losses import build_image_vae_loss
from model.image.vae import ImageVAE, ImageVAEConfig
from model.vae import VAELoss
from training.image_metrics import psnr, ssim
from training.loop import evaluate_means
from training.task import Adversary, Image, LossTerms, TrainingTask

logger = logging.getLogger(__name__)


def to_signed_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def _parameter_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


@contextlib.contextmanager
def _captured_input(layer: nn.Module):
    """{"input": the input of `layer`'s forward call} while inside."""
    captured = {}
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.__setitem__("input", inputs[0]))
    try:
        yield captured
    finally:
        handle.remove()


def _generator_terms(vae_loss: VAELoss, model: ImageVAE, target: torch.Tensor, reconstruction: torch.Tensor,
                     last_input: torch.Tensor, posterior, step: int, discriminator) -> tuple[dict, torch.Tensor]:
    """VAELoss.generator_loss, arranged so that it also works under DeepSpeed; returns (its terms, the loss).

    target, reconstruction: (B, 3, H, W); last_input: the input of the decoder's last convolution, whose output
    is `reconstruction`. DeepSpeed's engine hooks the tensors its forward returns and treats any backward pass
    through them as its own (the prologue, then a gradient all-reduce when that pass ends), so the adaptive
    weight's torch.autograd.grad must not pass through `reconstruction`. The terms are therefore computed on
    `twin`, the last convolution applied again to its input (the same values, and the same gradients for every
    weight); `reconstruction` joins the loss with weight 0, so that the engine's backward still starts at its
    outputs. With the plain engine the arrangement changes nothing but one extra convolution. discriminator:
    None or the frozen PatchGAN module (the loop's GAN protocol, training/task.py)."""
    twin = model.decoder.conv_out(last_input)
    terms = vae_loss.generator_loss(target, twin, posterior, step, model.last_layer, discriminator)
    return terms, terms["loss"] + 0.0 * reconstruction.float().mean()


def _reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """originals, reconstructions: (N, 3, H, W) in [-1, 1] -> (3, 2H, N*W) in [0, 1], originals on top."""
    rows = [torch.cat(list(images.float().clamp(-1, 1)), dim=-1) for images in (originals, reconstructions)]
    return (torch.cat(rows, dim=-2) + 1.0) / 2.0


def _measure(model, batch: dict) -> dict:
    """Validation metrics of one batch, decoding the posterior mean (no randomness): L1 in [-1, 1] (as
    train/reconstruction with reconstruction_loss l1), PSNR and SSIM of the clamped images in [0, 1]."""
    target = to_signed_unit(batch["image"])
    reconstruction = model(target.to(_parameter_dtype(model)), sample_posterior=False)[0].float()
    clamped, reference = (reconstruction.clamp(-1, 1) + 1) / 2, (target + 1) / 2
    return {"reconstruction": (reconstruction - target).abs().mean(), "psnr": psnr(reference, clamped).mean(),
            "ssim": ssim(reference, clamped).mean()}


def build_image_vae_task(model: ImageVAE, config: ImageVAEConfig, train_cache: ShardedCache,
                         val_cache: ShardedCache, args, context) -> TrainingTask:
    """The TrainingTask (with the PatchGAN as its adversary when config.use_discriminator).

    args: batch_size, seed, eval_batches, eval_steps, generation_steps (default eval_steps), sample_images,
    discriminator_lr (default learning_rate). The GAN starts at config.disc_start_step."""
    train = CachedBatches(train_cache, args.batch_size, args.seed, context.rank, context.world_size, stack_images)
    val_items = fixed_items(val_cache, args.eval_batches * args.batch_size)
    val = [stack_images(val_items[start:start + args.batch_size])
           for start in range(0, len(val_items), args.batch_size)]
    sample_images = stack_images(val_items[:args.sample_images])["image"]
    vae_loss = build_image_vae_loss(config)
    logged = ["reconstruction", "kl"] + (["perceptual"] if config.perceptual_weight > 0 else []) + \
        (["adversarial", "adaptive_weight"] if config.use_discriminator else [])

    def loss(forward, batch: dict, step: int, discriminator=None) -> LossTerms:
        """forward: the model (or DeepSpeed's engine around it); batch["image"]: uint8 (B, 3, H, W);
        discriminator: None before the GAN starts, else the frozen PatchGAN module."""
        target = to_signed_unit(batch["image"])
        with _captured_input(model.decoder.conv_out) as captured:
            reconstruction, posterior = forward(target.to(_parameter_dtype(model)))
        terms, total = _generator_terms(vae_loss, model, target, reconstruction, captured["input"], posterior, step,
                                        discriminator)
        return LossTerms(total, logs={name: terms[name] for name in logged}, outputs={"reconstruction": reconstruction})

    def discriminator_loss(discriminator, batch: dict, outputs: dict) -> LossTerms:
        # the loop calls the adversary only from its start_step on, where the hinge loss counts in full
        terms = vae_loss.discriminator_loss(to_signed_unit(batch["image"]), outputs["reconstruction"],
                                            vae_loss.disc_start_step, discriminator)
        return LossTerms(terms["loss"], logs={"logits_real": terms["logits_real"],
                                              "logits_fake": terms["logits_fake"]})

    def evaluate(eval_model) -> dict:
        metrics = evaluate_means(eval_model, val, _measure, context.device)
        return {f"eval/{name}": value for name, value in metrics.items()}

    @torch.no_grad()
    def samples(eval_model) -> dict:
        was_training = eval_model.training
        eval_model.eval()
        originals = to_signed_unit(sample_images.to(context.device))
        reconstructions = eval_model(originals.to(_parameter_dtype(eval_model)), sample_posterior=False)[0]
        eval_model.train(was_training)
        return {"samples/reconstruction": Image(_reconstruction_grid(originals, reconstructions).cpu())}

    adversary = None
    if config.use_discriminator:
        adversary = Adversary(module=build_discriminator(config), loss=discriminator_loss,
                              start_step=config.disc_start_step, learning_rate=args.discriminator_lr,
                              name="discriminator")
    logger.info("image VAE: %d train images (%d batches per epoch per rank), %d validation images",
                len(train_cache), train.batches_per_epoch, len(val_items))
    return TrainingTask(model=model, config=config, train_batch=train.batch, loss=loss,
                        batch_size=lambda batch: batch["image"].shape[0], throughput_unit="images",
                        evaluate=evaluate, samples=samples, generation_steps=args.generation_steps or args.eval_steps,
                        adversary=adversary)
