"""Autoregressive generation on the KV cache, for any model whose forward takes
(input_ids, attention_mask, past_key_values, use_cache) and returns `.logits` and `.past_key_values`.

Logits are processed in the order Hugging Face uses: repetition penalty, temperature, top-k, top-p.
"""

from typing import Optional

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits: (B, V); seen: (B, V) bool, tokens already in the sequence. Their positive logits are divided by
    `penalty` and negative ones multiplied (CTRL, Keskar et al. 2019)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k largest logits of each row (ties at the k-th value kept too); others become -inf."""
    top_k = min(top_k, logits.shape[-1])
    threshold = logits.topk(top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of all strictly more likely tokens
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def left_pad(sequences: list[list[int]], pad_token_id: Optional[int],
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists of different lengths → (input_ids (B, T), attention_mask (B, T)), padded on the left
    (with pad_token_id, or 0 when there is none) as generate expects."""
    longest = max(len(ids) for ids in sequences)
    pad = pad_token_id if pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (longest - len(ids)) + list(ids) for ids in sequences], device=device)
    mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in sequences], device=device)
    return input_ids, mask


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, repetition_penalty: float = 1.0,
             eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """input_ids: (B, T) prompts, left-padded when their lengths differ (attention_mask (B, T) marks real tokens)
    → (B, T + n) with n ≤ max_new_tokens. Greedy unless do_sample. A row that produced eos_token_id is
    finished: later positions hold pad_token_id (eos_token_id when there is no pad). Stops when all rows are."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be positive when sampling, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be positive, got {repetition_penalty}")
    was_training = model.training
    model.eval()
    B = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    vocab_size = model.config.vocab_size
    seen = torch.zeros(B, vocab_size, device=input_ids.device).scatter_add_(1, input_ids, attention_mask.float()) > 0
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    fill = pad_token_id if pad_token_id is not None else eos_token_id

    sequences, step_input, cache = input_ids, input_ids, None
    for _ in range(max_new_tokens):
        out = model(step_input, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1].float()
        if repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        if do_sample:
            logits = logits / temperature
            if top_k is not None:
                logits = apply_top_k(logits, top_k)
            if top_p is not None:
                logits = apply_top_p(logits, top_p)
            next_token = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            next_token = logits.argmax(dim=-1)
        if fill is not None:
            next_token = torch.where(finished, torch.full_like(next_token, fill), next_token)
        sequences = torch.cat((sequences, next_token[:, None]), dim=1)
        seen[torch.arange(B), next_token] = True
        attention_mask = torch.cat((attention_mask, (~finished).long()[:, None].to(attention_mask.dtype)), dim=1)
        if eos_token_id is not None:
            finished |= next_token == eos_token_id
            if bool(finished.all()):
                break
        step_input = next_token[:, None]
    model.train(was_training)
    return sequences
