"""Autoregressive generation on the KV cache, for any model whose forward takes
(input_ids, attention_mask, past_key_values, use_cache) and returns `.logits` and `.past_key_values`.

Logits are processed in the order Hugging Face uses: repetition penalty, temperature, top-k, top-p.

Two caches: by default the model's growing KVCache; with `static_cache` (or `compile`) a StaticKVCache of
fixed shapes (model/transformer/static_cache.py) whose one-token steps `compile` runs as one compiled graph.
"""

import weakref
from typing import Optional

import torch

from model.transformer.positions import position_ids_from_mask
from model.transformer.static_cache import StaticKVCache


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


class _GrowingCacheDecoder:
    """Steps on the model's own growing KVCache (any model with the forward described above)."""

    def __init__(self, model):
        self.model, self.mask, self.cache = model, None, None

    def step(self, input_ids: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, token_mask: (B, T) the next tokens and whether each is real → logits (B, V) of the last."""
        self.mask = token_mask if self.mask is None else torch.cat((self.mask, token_mask.to(self.mask.dtype)), dim=1)
        out = self.model(input_ids, attention_mask=self.mask, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1]


class _StaticCacheDecoder:
    """Steps on a StaticKVCache of `length` slots through the model's `decode_step`; with `compile`, the
    one-token steps run one torch.compile'd graph (the prompt's step runs eagerly)."""

    def __init__(self, model, batch_size: int, length: int, compile: bool):
        if not hasattr(model, "decode_step"):
            raise ValueError(f"static_cache/compile decoding needs a model with decode_step (the causal LM); "
                             f"{type(model).__name__} decodes on its growing KV cache: leave them off")
        config = model.config
        if (config.use_positional_embedding or config.use_sinusoidal_embedding) and \
                length > config.max_position_embeddings:
            raise ValueError(f"prompt + max_new_tokens = {length} positions exceed max_position_embeddings="
                             f"{config.max_position_embeddings} of the absolute position embedding")
        weight = next(model.parameters())
        self.model = model
        self.cache = _reusable_cache(model, batch_size, length, weight.dtype, weight.device)
        self.key_mask = torch.zeros(batch_size, length, dtype=torch.long, device=weight.device)
        self.used = 0
        self.compiled = _compiled_decode_step(weight.device, fullgraph=config.ffn_type != "moe") if compile else None

    def step(self, input_ids: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, token_mask: (B, T) the next tokens and whether each is real → logits (B, V) of the last."""
        T = input_ids.shape[1]
        slots = torch.arange(self.used, self.used + T, device=input_ids.device)
        self.key_mask[:, self.used:self.used + T] = token_mask
        self.used += T
        # a fresh tensor with standard strides: .contiguous() would keep the slice's strides for a (1, 1) slice, and
        # strides that change every step make the compiled step recompile every step
        position_ids = position_ids_from_mask(self.key_mask[:, :self.used])[:, -T:].clone(
            memory_format=torch.contiguous_format)
        if self.compiled is not None and T == 1:
            return self.compiled(self.model, input_ids, position_ids, self.key_mask, slots, self.cache)
        return self.model.decode_step(input_ids, position_ids, self.key_mask, slots, self.cache)


_static_caches: "weakref.WeakKeyDictionary[torch.nn.Module, StaticKVCache]" = weakref.WeakKeyDictionary()
_compiled_steps: dict = {}


def _reusable_cache(model, batch_size: int, length: int, dtype: torch.dtype, device: torch.device) -> StaticKVCache:
    """The model's static cache from an earlier call when its shapes fit (slots it held are masked until
    rewritten), else a new one: the same buffers keep a compiled step's graph valid across calls."""
    cache = _static_caches.get(model)
    if cache is None or not cache.fits(batch_size, length, dtype, device):
        cache = StaticKVCache.for_model(model.config, batch_size, length, dtype, device)
        _static_caches[model] = cache
    return cache


def _decode_step(model, input_ids, position_ids, key_mask, slots, cache):
    return model.decode_step(input_ids, position_ids, key_mask, slots, cache)


def _compiled_decode_step(device: torch.device, fullgraph: bool):
    """torch.compile of one decode step: CUDA graphs on GPUs ("reduce-overhead"), Inductor's default on CPU.
    fullgraph is off for MoE, whose dispatch has data-dependent shapes (a graph break)."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    key = (mode, fullgraph)
    if key not in _compiled_steps:
        _compiled_steps[key] = torch.compile(_decode_step, mode=mode, fullgraph=fullgraph, dynamic=False)
    return _compiled_steps[key]


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, repetition_penalty: float = 1.0,
             eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, static_cache: bool = False,
             compile: bool = False) -> torch.Tensor:
    """input_ids: (B, T) prompts, left-padded when their lengths differ (attention_mask (B, T) marks real tokens)
    → (B, T + n) with n ≤ max_new_tokens. Greedy unless do_sample. A row that produced eos_token_id is
    finished: later positions hold pad_token_id (eos_token_id when there is no pad). Stops when all rows are.

    static_cache: decode on a preallocated StaticKVCache of T + max_new_tokens slots (models with a
    `decode_step`: the causal LM). compile: also run every one-token step through torch.compile (implies
    static_cache). The first call compiles (seconds to minutes); later calls with the same batch size and
    T + max_new_tokens reuse the compiled step. Both give the tokens of the default path."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be positive when sampling, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be positive, got {repetition_penalty}")
    B, T = input_ids.shape
    decoder = (_StaticCacheDecoder(model, B, T + max_new_tokens, compile) if static_cache or compile
               else _GrowingCacheDecoder(model))
    was_training = model.training
    model.eval()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    vocab_size = model.config.vocab_size
    seen = torch.zeros(B, vocab_size, device=input_ids.device).scatter_add_(1, input_ids, attention_mask.float()) > 0
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    fill = pad_token_id if pad_token_id is not None else eos_token_id

    sequences, step_input, step_mask = input_ids, input_ids, attention_mask
    for _ in range(max_new_tokens):
        logits = decoder.step(step_input, step_mask).float()
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
        step_input, step_mask = next_token[:, None], (~finished).long()[:, None]
        if eos_token_id is not None:
            finished |= next_token == eos_token_id
            if bool(finished.all()):
                break
    model.train(was_training)
    return sequences
