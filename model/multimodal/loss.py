"""The training loss of the multimodal world model: next-token cross-entropy on text + lambda x the diffusion
loss on every media span (Transfusion, Zhou et al. 2024, eq. 4).

    loss, logs = multimodal_loss(model, config, batch, generator)

batch (all on one device): input_ids (B, T), attention_mask (B, T), labels (B, T) with -100 where no text loss is
wanted (latent positions, padding), and per media kind K of the config: K_latents (M, ...) clean latents,
K_rows (M,), K_starts (M,) (see MediaSpans) and K_noise_cap (M,) in (0, 1], the largest noise level of each span
as a fraction of the maximum (1 for media after its caption; the config's caption_noise_cap for media before
it, so the caption learns to read a mostly clean image).
"""

import torch

from model.diffusion.objectives import add_noise, check_objective, min_snr_weight, training_target
from model.diffusion.schedules import noise_schedule
from model.megatransformer_causal import shifted_cross_entropy
from model.multimodal.spans import MediaSpans


def capped_noise_levels(config, caps: torch.Tensor,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise levels uniform in [0, cap * max] per span → (alpha, sigma, model_timesteps), each (M,) float32.

    caps: (M,) in (0, 1]. VP objectives draw integer steps in [0, cap * T); flow matching draws t in [0, cap)."""
    check_objective(config.objective)
    T = config.num_train_timesteps
    fraction = torch.rand(caps.shape, generator=generator, device=caps.device) * caps.float()
    if config.objective == "flow_matching":
        return 1 - fraction, fraction, fraction * T
    timesteps = (fraction * T).long().clamp(max=T - 1)
    schedule = noise_schedule(config.schedule, T, config.beta_start, config.beta_end)
    alpha, sigma = schedule.coefficients(timesteps)
    return alpha, sigma, timesteps.float()


def multimodal_loss(model, config, batch: dict, generator: torch.Generator | None = None,
                    num_steps: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Noise each span, run the model once, and combine the losses.

    model: the multimodal model or the engine wrapping its forward; config: its MultimodalConfig.
    generator: on the batch's device, for reproducible noise (None: the global RNG). num_steps: the depth of a
    recurrent backbone (None: the model's default). The batch's optional K_conditions (M, D) condition kind K's
    spans (audio: speaker embeddings).
    Returns (loss: scalar float32, logs: {"text_loss", "K_loss" (the unweighted mean squared error of kind K),
    "K_noise_level" (mean sigma), "aux_loss"} as detached scalars). A batch with no text targets (or no spans
    of a kind) contributes 0 for that term.
    """
    spans, targets, weights, logs = {}, {}, {}, {}
    for kind in config.media_kinds:
        x0 = batch[f"{kind}_latents"].float()
        alpha, sigma, model_timesteps = capped_noise_levels(config, batch[f"{kind}_noise_cap"], generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        spans[kind] = MediaSpans(add_noise(x0, noise, alpha, sigma), model_timesteps, batch[f"{kind}_rows"],
                                 batch[f"{kind}_starts"], batch.get(f"{kind}_conditions"))
        targets[kind] = training_target(config.objective, x0, noise, alpha, sigma)
        weights[kind] = (torch.ones_like(alpha) if config.min_snr_gamma is None
                         else min_snr_weight(config.objective, alpha, sigma, config.min_snr_gamma))
        logs[f"{kind}_noise_level"] = sigma.mean().detach() if len(x0) else sigma.new_zeros(())
    depth = {} if num_steps is None else {"num_steps": num_steps}
    output = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), media=spans, **depth)

    labels = batch["labels"]
    has_text = bool((labels[:, 1:] != -100).any())
    text_loss = shifted_cross_entropy(output.logits, labels) if has_text else output.logits.new_zeros((), dtype=torch.float32)
    loss = text_loss + output.aux_loss
    logs["text_loss"] = text_loss.detach()
    for kind in config.media_kinds:
        if len(targets[kind]) == 0:
            logs[f"{kind}_loss"] = text_loss.new_zeros(())
            continue
        mse = (output.media[kind].float() - targets[kind]).square().flatten(1).mean(1)
        loss = loss + config.diffusion_loss_weight * (weights[kind] * mse).mean()
        logs[f"{kind}_loss"] = mse.mean().detach()
    logs["aux_loss"] = output.aux_loss.detach()
    return loss, logs
