"""Classifier-free guidance (Ho & Salimans 2022): condition dropout in training, guided predictions in sampling.

A denoiser here is called as `model(x_t, model_timesteps, text_emb, text_mask, drop_condition=None)` with
text_emb: (B, L, D_text), text_mask: (B, L) bool (True = a real token) and drop_condition: (B,) bool or
None. Rows with drop_condition True see the model's own learned null condition instead of their text
(the DiT swaps it in inside its forward, so the null embedding trains with everything else and also
works under ZeRO-3). Training drops each row with probability `cfg_dropout`; sampling mixes

    guided = uncond + scale * (cond - uncond)

where `uncond` is the prediction under the learned null condition, or under explicit unconditional
embeddings (e.g. a text encoder's embedding of the empty prompt) when given.
"""

import torch


def condition_dropout_mask(batch_size: int, probability: float, device: torch.device,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) bool, each True with `probability`: the rows trained without their condition."""
    if not 0.0 <= probability < 1.0:
        raise ValueError(f"cfg_dropout must be in [0, 1), got {probability}")
    return torch.rand(batch_size, generator=generator, device=device) < probability


def pad_text(text_emb: torch.Tensor, text_mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad text_emb (B, L, D) and text_mask (B, L) to `length` >= L with zeros / False."""
    extra = length - text_emb.shape[1]
    if extra == 0:
        return text_emb, text_mask
    return (torch.nn.functional.pad(text_emb, (0, 0, 0, extra)),
            torch.nn.functional.pad(text_mask.bool(), (0, extra), value=False))


def guided_prediction(model, x_t: torch.Tensor, model_timesteps: torch.Tensor, text_emb: torch.Tensor,
                      text_mask: torch.Tensor, guidance_scale: float, uncond_emb: torch.Tensor | None = None,
                      uncond_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The guided network output (B, ...) float32 for x_t (B, ...) at model_timesteps (B,).

    guidance_scale 1 is the conditional model alone (one forward pass); otherwise the conditional and
    unconditional halves run as one batch of 2B. uncond_emb: (B or 1, L', D_text) with uncond_mask
    (B or 1, L') bool, or None for the model's learned null condition.
    """
    if guidance_scale == 1.0:
        return model(x_t, model_timesteps, text_emb, text_mask).float()
    batch = x_t.shape[0]
    if uncond_emb is None:
        if uncond_mask is not None:
            raise ValueError("uncond_mask was given without uncond_emb: pass both, or neither for the null condition")
        drop = torch.arange(2 * batch, device=x_t.device) >= batch
        both_text, both_mask = torch.cat((text_emb, text_emb)), torch.cat((text_mask, text_mask))
    else:
        if uncond_mask is None or uncond_mask.shape != uncond_emb.shape[:2]:
            raise ValueError(f"uncond_mask must be (B, L') bool matching uncond_emb {tuple(uncond_emb.shape)}, "
                             f"got {None if uncond_mask is None else tuple(uncond_mask.shape)}")
        if uncond_emb.shape[0] not in (1, batch):
            raise ValueError(f"uncond_emb holds {uncond_emb.shape[0]} rows: give 1 (shared by the batch) "
                             f"or {batch} (one per sample)")
        uncond_emb = uncond_emb.expand(batch, -1, -1)
        uncond_mask = uncond_mask.expand(batch, -1)
        length = max(text_emb.shape[1], uncond_emb.shape[1])
        cond_emb, cond_mask = pad_text(text_emb, text_mask, length)
        uncond_emb, uncond_mask = pad_text(uncond_emb.to(text_emb.dtype), uncond_mask, length)
        drop = None
        both_text, both_mask = torch.cat((cond_emb, uncond_emb)), torch.cat((cond_mask.bool(), uncond_mask.bool()))
    output = model(torch.cat((x_t, x_t)), torch.cat((model_timesteps, model_timesteps)), both_text, both_mask,
                   drop_condition=drop).float()
    cond, uncond = output.chunk(2)
    return uncond + guidance_scale * (cond - uncond)
