"""Batches of the multimodal world model from an interleaved cache (written by preprocess_multimodal_dataset.py).

    layout = SequenceLayout(bos=0, eos=0, pad=1, begin={"image": 512}, end={"image": 513}, span_length={"image": 16})
    batch = collate_multimodal(items, layout, {"image": 0.8}, caption_dropout=0.1, caption_noise_cap=0.5,
                               generator=torch.Generator().manual_seed(i))

A cache item is one of
    captioned media of kind K in one order:  caption_ids (L,) int, caption, order ("caption_first" | "image_first"),
                                             K_latent_mean and optionally K_latent_logvar (the latents' shape),
                                             optionally K_condition (D,)
        an image:  image_latent_mean, image_latent_logvar (C, h, w) of the VAE posterior
        a clip:    audio_latent_mean (channels, frames) (its frames, no posterior), audio_condition (D,) the
                   speaker embedding; its caption is the transcript
    a text-only window:  text_ids (L,) int
and becomes the sequence
    caption_first:  bos caption begin [N latent positions] end eos       (text to image, text to speech)
                    (with probability caption_dropout: bos begin [N] end, nothing after it is trained)
    image_first:    bos begin [N] end caption eos      (media first, whatever its kind: captioning, recognition;
                    noise capped at caption_noise_cap, so the caption reads it)
    text:           text_ids as they are
Rows are right-padded with `pad`. The batch (CPU tensors): input_ids, attention_mask, labels (B, T) (-100 at
latent positions, padding and after a dropped caption's media), and per kind K: K_latents (M, ...) sampled from the
stored posterior (or the stored latents when there is no logvar) and multiplied by the kind's scale factor,
K_rows, K_starts (M,) long, K_noise_cap (M,) float and, for kinds whose items hold one, K_conditions (M, D): what
model/multimodal/loss.py reads. Every random choice comes from `generator`.
"""

from dataclasses import dataclass

import torch

CAPTION_FIRST, IMAGE_FIRST = "caption_first", "image_first"
ORDERS = (CAPTION_FIRST, IMAGE_FIRST)


@dataclass
class SequenceLayout:
    """The special token ids and span lengths a sequence is built with (from the model's config)."""

    bos: int
    eos: int
    pad: int
    begin: dict
    end: dict
    span_length: dict

    @classmethod
    def from_config(cls, config, span_length: dict) -> "SequenceLayout":
        return cls(bos=config.bos_token_id, eos=config.eos_token_id, pad=config.pad_token_id,
                   begin={kind: config.begin_token_id(kind) for kind in config.media_kinds},
                   end={kind: config.end_token_id(kind) for kind in config.media_kinds}, span_length=span_length)


def item_kind(item: dict) -> str | None:
    """The media kind of a captioned-media item (its `<kind>_latent_mean` key), or None for a text item."""
    kinds = [key.removesuffix("_latent_mean") for key in item if key.endswith("_latent_mean")]
    return kinds[0] if kinds else None


def build_sequence(item: dict, layout: SequenceLayout, drop_caption: bool) -> tuple[list, list, int | None]:
    """One item → (token ids, labels, start of its span or None). Latent positions hold `pad` (replaced by
    the media encoder) and label -100."""
    kind = item_kind(item)
    if kind is None:
        ids = item["text_ids"].tolist()
        return ids, list(ids), None
    if kind not in layout.begin:
        raise ValueError(f"the cache holds '{kind}' items but the model's config has no '{kind}' media: use a "
                         f"config with a '{kind}' entry in its media")
    caption = item["caption_ids"].tolist()
    n = layout.span_length[kind]
    span = [layout.begin[kind]] + [layout.pad] * n + [layout.end[kind]]
    span_labels = [layout.begin[kind]] + [-100] * n + [layout.end[kind]]
    if item["order"] == IMAGE_FIRST:
        ids = [layout.bos] + span + caption + [layout.eos]
        return ids, [layout.bos] + span_labels + caption + [layout.eos], 2
    if item["order"] != CAPTION_FIRST:
        raise ValueError(f"unknown item order {item['order']!r}: the cache must hold one of {ORDERS}")
    if drop_caption:
        return [layout.bos] + span, [layout.bos] + span_labels[:-1] + [-100], 2
    ids = [layout.bos] + caption + span + [layout.eos]
    return ids, [layout.bos] + caption + span_labels + [layout.eos], 2 + len(caption)


def collate_multimodal(items: list[dict], layout: SequenceLayout, scale_factors: dict, caption_dropout: float,
                       caption_noise_cap: float, generator: torch.Generator) -> dict:
    """Cache items → the batch described in the module docstring."""
    rows, media = [], {kind: [] for kind in layout.begin}
    drops = (torch.rand(len(items), generator=generator) < caption_dropout).tolist()
    for row, (item, drop) in enumerate(zip(items, drops)):
        ids, labels, start = build_sequence(item, layout, drop)
        rows.append((ids, labels))
        kind = item_kind(item)
        if kind is not None:
            latents, logvar = item[f"{kind}_latent_mean"].float(), item.get(f"{kind}_latent_logvar")
            if logvar is not None:
                latents = latents + torch.exp(0.5 * logvar.float()) * torch.randn(latents.shape, generator=generator)
            cap = caption_noise_cap if item["order"] == IMAGE_FIRST else 1.0
            media[kind].append((latents * scale_factors[kind], row, start, cap, item.get(f"{kind}_condition")))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(items), length), layout.pad, dtype=torch.long)
    labels = torch.full((len(items), length), -100, dtype=torch.long)
    attention_mask = torch.zeros(len(items), length, dtype=torch.long)
    for row, (ids, row_labels) in enumerate(rows):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(ids)] = torch.tensor(row_labels)
        attention_mask[row, :len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    for kind, spans in media.items():
        batch[f"{kind}_latents"] = torch.stack([span[0] for span in spans]) if spans else torch.zeros(0)
        batch[f"{kind}_rows"] = torch.tensor([span[1] for span in spans], dtype=torch.long)
        batch[f"{kind}_starts"] = torch.tensor([span[2] for span in spans], dtype=torch.long)
        batch[f"{kind}_noise_cap"] = torch.tensor([span[3] for span in spans], dtype=torch.float32)
        conditions = [span[4] for span in spans]
        if any(condition is not None for condition in conditions):
            if any(condition is None for condition in conditions):
                raise ValueError(f"some '{kind}' items of the cache hold a {kind}_condition and some do not: "
                                 "rewrite the cache with preprocess_multimodal_dataset.py")
            batch[f"{kind}_conditions"] = torch.stack([condition.float() for condition in conditions])
    return batch
