"""Generation with the mode switch (Transfusion, section 3.3): text on the KV cache until a begin-of-media token,
then the span sampled by the diffusion sampler over the cached prefix, its clean latents committed to the cache,
the end token, and text again.

    segments = generate_multimodal(model, [TextSegment([bos] + caption_ids + [begin_image])], guidance_scale=3.0)
    segments = generate_multimodal(model, [TextSegment([bos]), MediaSegment("image", latents)])  # a caption
    segments = generate_multimodal(model, [TextSegment([bos]), MediaSegment("audio", frames, speaker)])  # transcript
    frames = text_to_media(model, prompt_ids, "audio", condition=speaker)       # speech in a reference voice

One sequence at a time. A prompt is a list of segments: TextSegment (token ids) and MediaSegment (clean latents
of one span, e.g. (C, h, w), and its conditioning vector, e.g. a speaker embedding), which the prompt brackets
with the kind's begin and end tokens. Spans the model generates take their conditioning vector from
`conditions` (kind → (D,)). A recurrent backbone runs at depth num_steps (default its
recurrent_mean_thinking_steps). A prompt that ends with a begin token starts with that span. Each denoising step
runs the span's positions against the cached prefix and is then rolled back; classifier-free guidance runs the
unconditional branch over the prefix that training used for a dropped caption ([bos, begin]) (with the span's own
conditioning vector in both branches). The result is the generated part only, as segments.
"""

from dataclasses import dataclass
from typing import Optional, Union

import torch

from model.diffusion.samplers import sample
from model.generation import apply_top_k
from model.multimodal.spans import MediaSpans, SpanKVCache


@dataclass
class TextSegment:
    token_ids: list


@dataclass
class MediaSegment:
    """latents: one span's clean latents, e.g. (C, h, w) for an image (scaled as in training); condition: its
    conditioning vector (D,) (audio: the speaker embedding) or None."""

    kind: str
    latents: torch.Tensor
    condition: Optional[torch.Tensor] = None


Segment = Union[TextSegment, MediaSegment]


def prompt_tensors(model, segments: list, device: torch.device) -> tuple[torch.Tensor, dict]:
    """Prompt segments → (input_ids (1, T), media: kind → MediaSpans of clean latents at timestep 0)."""
    config, ids, spans = model.config, [], {}
    for segment in segments:
        if isinstance(segment, TextSegment):
            ids += [int(token) for token in segment.token_ids]
            continue
        config.begin_token_id(segment.kind)  # a clear error for a kind the config lacks
        spans.setdefault(segment.kind, []).append((segment.latents, len(ids) + 1, segment.condition))
        ids += [config.begin_token_id(segment.kind)] + [0] * model.span_length(segment.kind) + \
            [config.end_token_id(segment.kind)]
    if not ids:
        raise ValueError("the prompt is empty: give at least one token (e.g. the tokenizer's BOS) or one media span")
    media = {}
    for kind, entries in spans.items():
        latents = torch.stack([latents for latents, _, _ in entries]).to(device).float()
        starts = torch.tensor([start for _, start, _ in entries], device=device)
        media[kind] = MediaSpans(latents, torch.zeros(len(entries), device=device),
                                 torch.zeros(len(entries), dtype=torch.long, device=device), starts,
                                 stack_conditions(kind, [condition for _, _, condition in entries], device))
    return torch.tensor([ids], device=device), media


def stack_conditions(kind: str, conditions: list, device: torch.device) -> Optional[torch.Tensor]:
    """Per-span conditioning vectors (D,) or Nones → (M, D) float32, or None when no span has one."""
    if all(condition is None for condition in conditions):
        return None
    if any(condition is None for condition in conditions):
        raise ValueError(f"some '{kind}' spans of the prompt have a conditioning vector and some do not: give one "
                         "for every span (audio: the speaker embedding of each clip)")
    return torch.stack([condition.float() for condition in conditions]).to(device)


class SpanDenoiser:
    """The model as a denoiser of one span for model/diffusion/samplers.sample: called as (x_t (R, ...),
    timesteps (R,), text_emb, text_mask, drop_condition (R,) bool or None), it runs each row's span against the
    conditional cache (or, where drop_condition, the unconditional one) and rolls the caches back."""

    def __init__(self, model, kind: str, cache: SpanKVCache, uncond_cache: Optional[SpanKVCache],
                 condition: Optional[torch.Tensor] = None):
        self.model, self.kind, self.config, self.condition = model, kind, model.config, condition
        self.caches = {False: cache, True: uncond_cache}

    def __call__(self, x_t, timesteps, text_emb=None, text_mask=None, drop_condition=None) -> torch.Tensor:
        rows = torch.zeros(x_t.shape[0], dtype=torch.bool, device=x_t.device) if drop_condition is None \
            else drop_condition.bool()
        output = torch.empty_like(x_t, dtype=torch.float32)
        for dropped in (False, True):
            index = (rows == dropped).nonzero().flatten().tolist()
            for row in index:
                output[row] = self._predict(self.caches[dropped], x_t[row:row + 1], timesteps[row:row + 1])[0]
        return output

    def _predict(self, cache: SpanKVCache, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if cache is None:
            raise ValueError("guidance needs the unconditional cache")
        length, n = len(cache), self.model.span_length(self.kind)
        spans = MediaSpans(x_t, timesteps.float(), torch.zeros(1, dtype=torch.long, device=x_t.device),
                           torch.zeros(1, dtype=torch.long, device=x_t.device), self.condition)
        placeholders = torch.zeros(1, n, dtype=torch.long, device=x_t.device)
        output = self.model(placeholders, media={self.kind: spans}, past_key_values=cache, use_cache=True)
        cache.rollback(length)
        return output.media[self.kind].float()


@torch.no_grad()
def sample_span(model, kind: str, cache: SpanKVCache, guidance_scale: float, steps: Optional[int],
                generator: Optional[torch.Generator], device: torch.device,
                condition: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sample one span of `kind` after the cached prefix (which ends with the begin token), commit its clean
    latents to the cache and return them: (C, ...) float32. condition: the span's conditioning vector (D,)."""
    condition = None if condition is None else condition.float().reshape(1, -1).to(device)
    config = model.config
    uncond_cache = None
    if guidance_scale != 1.0:
        if config.bos_token_id is None:
            raise ValueError("classifier-free guidance needs the config's bos_token_id (the unconditional prefix is "
                             "[bos, begin]); pass guidance_scale 1 for a model without one")
        uncond_cache = SpanKVCache()
        model(torch.tensor([[config.bos_token_id, config.begin_token_id(kind)]], device=device),
              past_key_values=uncond_cache, use_cache=True)
    shape = (1, *model.media_encoders[kind].shape)
    placeholder_text = torch.zeros(1, 1, 1, device=device)
    latents = sample(SpanDenoiser(model, kind, cache, uncond_cache, condition), shape, placeholder_text,
                     torch.ones(1, 1, dtype=torch.bool, device=device), guidance_scale=guidance_scale, steps=steps,
                     generator=generator)
    clean = MediaSpans(latents, torch.zeros(1, device=device), torch.zeros(1, dtype=torch.long, device=device),
                       torch.zeros(1, dtype=torch.long, device=device), condition)
    model(torch.zeros(1, model.span_length(kind), dtype=torch.long, device=device), media={kind: clean},
          past_key_values=cache, use_cache=True)
    return latents[0]


@torch.no_grad()
def generate_multimodal(model, prompt: list, max_new_tokens: int = 64, do_sample: bool = False,
                        temperature: float = 1.0, top_k: Optional[int] = None, guidance_scale: Optional[float] = None,
                        steps: Optional[int] = None, max_media: int = 1, eos_token_id: Optional[int] = None,
                        generator: Optional[torch.Generator] = None, conditions: Optional[dict] = None,
                        num_steps: Optional[int] = None) -> list:
    """Continue `prompt` (segments) → the generated segments (text and media, in order).

    Text is greedy unless do_sample (temperature, top_k). At most max_new_tokens text tokens (begin and end
    tokens included) and max_media spans are generated; past max_media a begin token is never chosen. Stops at
    eos_token_id (default config.eos_token_id), which is not returned. guidance_scale and steps default to the
    config's; generator (on the model's device) seeds the samplers and the text sampling. conditions: kind → the
    conditioning vector (D,) of the spans generated of that kind. num_steps: a recurrent backbone's depth."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be positive when sampling, got {temperature}")
    config = model.config
    device = next(model.parameters()).device
    guidance_scale = config.guidance_scale if guidance_scale is None else guidance_scale
    eos_token_id = config.eos_token_id if eos_token_id is None else eos_token_id
    conditions = conditions or {}
    if num_steps is not None and config.backbone != "recurrent":
        raise ValueError(f"num_steps={num_steps} needs a recurrent backbone, but config '{config.name}' has "
                         "backbone: causal")
    was_training = model.training
    model.eval()
    if config.backbone == "recurrent":
        previous_depth = model.generation_num_steps
        model.generation_num_steps = num_steps or config.recurrent_mean_thinking_steps
    try:
        return _generate(model, prompt, max_new_tokens, do_sample, temperature, top_k, guidance_scale, steps,
                         max_media, eos_token_id, generator, conditions, device)
    finally:
        model.train(was_training)
        if config.backbone == "recurrent":
            model.generation_num_steps = previous_depth


def _generate(model, prompt, max_new_tokens, do_sample, temperature, top_k, guidance_scale, steps, max_media,
              eos_token_id, generator, conditions, device) -> list:
    config = model.config
    input_ids, media = prompt_tensors(model, prompt, device)
    cache = SpanKVCache()
    logits = model(input_ids, media=media, past_key_values=cache, use_cache=True).logits[0, -1]
    last_token = int(input_ids[0, -1])
    generated, text, sampled_media, produced = [], [], 0, 0
    begin_ids = torch.tensor([config.begin_token_id(kind) for kind in config.media_kinds], device=device)
    while True:
        kind = config.kind_of_begin_token(last_token)
        if kind is not None:  # the mode switch: sample the span, commit it, close it
            if text:
                generated.append(TextSegment(text))
                text = []
            condition = conditions.get(kind)
            generated.append(MediaSegment(kind, sample_span(model, kind, cache, guidance_scale, steps, generator,
                                                            device, condition), condition))
            sampled_media += 1
            last_token = config.end_token_id(kind)
            produced += 1
        else:
            if produced >= max_new_tokens:
                break
            logits = logits.float().clone()
            if sampled_media >= max_media and len(begin_ids):
                logits[begin_ids] = float("-inf")
            if do_sample:
                logits = logits / temperature
                if top_k is not None:
                    logits = apply_top_k(logits[None], top_k)[0]
                last_token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
            else:
                last_token = int(logits.argmax())
            produced += 1
            if eos_token_id is not None and last_token == eos_token_id:
                break
            if config.kind_of_begin_token(last_token) is None:
                text.append(last_token)
        logits = model(torch.tensor([[last_token]], device=device), past_key_values=cache,
                       use_cache=True).logits[0, -1]
    if text:
        generated.append(TextSegment(text))
    return generated


def text_to_media(model, prompt_ids: list, kind: str = "image", guidance_scale: Optional[float] = None,
                  steps: Optional[int] = None, generator: Optional[torch.Generator] = None,
                  condition: Optional[torch.Tensor] = None, num_steps: Optional[int] = None) -> torch.Tensor:
    """The clean latents (C, ...) of one span of `kind` sampled after [bos] + prompt_ids + [begin] (text to image,
    text to speech with the speaker embedding `condition`)."""
    config = model.config
    prompt = [TextSegment([config.bos_token_id, *prompt_ids, config.begin_token_id(kind)])]
    generated = generate_multimodal(model, prompt, max_new_tokens=1, guidance_scale=guidance_scale, steps=steps,
                                    generator=generator, conditions={kind: condition}, num_steps=num_steps)
    return generated[0].latents


def caption_media(model, latents: torch.Tensor, kind: str = "image", max_new_tokens: int = 48,
                  condition: Optional[torch.Tensor] = None, num_steps: Optional[int] = None) -> list:
    """The greedy caption (token ids, eos excluded) of one clean span: text after [bos] begin span end (a
    caption of an image, the transcript of a clip)."""
    generated = generate_multimodal(model, [TextSegment([model.config.bos_token_id]),
                                            MediaSegment(kind, latents, condition)],
                                    max_new_tokens=max_new_tokens, max_media=0, num_steps=num_steps)
    return [token for segment in generated if isinstance(segment, TextSegment) for token in segment.token_ids]
