"""The multimodal world model (Transfusion's design on our transformer blocks): text tokens and media spans in one
sequence, next-token prediction on text and diffusion on media.

    model = MegaTransformerMultimodal(MultimodalConfig.from_name("tiny"))
    spans = {"image": MediaSpans(noisy_latents, timesteps, rows, starts),
             "audio": MediaSpans(noisy_frames, timesteps, rows, starts, speaker_embeddings)}
    out = model(input_ids, media=spans)          # out.logits (B, T, total_vocab), out.media["image"] (M, C, h, w),
                                                 # out.media["audio"] (M, channels, frames)
    loss, logs = multimodal_loss(model, batch)   # model/multimodal/loss.py
    segments = generate_multimodal(model, [TextSegment(ids)], ...)   # model/multimodal/generation.py

A span of kind K is `begin_K, N latent positions, end_K`; the batch's input_ids hold any token id at the latent
positions (they are replaced by the media encoder's embeddings). Attention is causal across the sequence and
bidirectional inside a span (unless the media entry says attention: causal) (model/transformer/attention.py:
build_attention_bias with span ids). The backbone is the config's `backbone`: `causal`, the stack of
model/megatransformer_causal.py with every MegaTransformerConfig knob (GQA, RoPE/ALiBi, MoE, norms, sliding
window, gradient checkpointing), or `recurrent`, the recurrent-depth core of model/megatransformer_recurrent.py
(prelude, core iterated r times, coda; its recurrent_* keys): training draws r per step (pass num_steps), and
evaluation runs a fixed depth (num_steps) or the config's exit criterion.

    out = model(input_ids, media=spans, num_steps=8)     # a recurrent backbone at depth 8

`lookup` names every YAML file in configs/multimodal/ (tiny, tiny_recurrent, small, medium).
A checkpoint loads with model.pretrained.load_pretrained (family "multimodal"); `is_multimodal_config` is
pretrain_wm.py's rule for choosing this family by config name.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from megatransformer_utils import CONFIG_DIR, _load_yaml, resolve_config_path
from model.megatransformer_causal import count_parameters, init_weights
from model.megatransformer_recurrent import RecurrentDepth
from model.multimodal.config import MultimodalConfig
from model.multimodal.media import build_media_codec, is_bidirectional, num_positions
from model.multimodal.spans import SpanKVCache
from model.transformer.block import GradientCheckpointing, TransformerBlock, run_blocks
from model.transformer.embedding import DecoderEmbedding
from model.transformer.moe import combine_moe_terms
from model.transformer.norms import make_norm

lookup = {path.stem: path for path in sorted((CONFIG_DIR / "multimodal").glob("*.yaml"))}


@dataclass
class MultimodalOutput:
    """logits: (B, T, total_vocab_size); media: kind → the decoder's prediction for each span (M, ...), the
    latents' shape; aux_loss: the weighted MoE terms (0 for dense models); moe_losses: unweighted or None.
    A recurrent backbone also gives thinking_steps (B, T), the core iterations each position used, and num_steps,
    the iterations run in all."""

    logits: torch.Tensor
    media: dict
    aux_loss: torch.Tensor
    moe_losses: Optional[torch.Tensor] = None
    past_key_values: Optional[SpanKVCache] = None
    thinking_steps: Optional[torch.Tensor] = None
    num_steps: int = 0


class MegaTransformerMultimodal(RecurrentDepth, GradientCheckpointing, nn.Module):
    """Embedding (text tokens + media encoders) → the backbone (n_layers blocks, or prelude, core × r and coda)
    → final norm → LM head and media decoders."""

    def __init__(self, config: MultimodalConfig):
        super().__init__()
        self.config = config
        self.embedding = DecoderEmbedding(dataclasses.replace(config, vocab_size=config.total_vocab_size))
        if config.backbone == "recurrent":
            self.build_recurrent_layers(config)
        else:
            self.blocks = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.final_norm = make_norm(config, config.use_final_norm)
        self.lm_head = nn.Linear(config.hidden_size, config.total_vocab_size, bias=False)
        codecs = {kind: build_media_codec(kind, config.media[kind], config.hidden_size) for kind in config.media_kinds}
        self.media_encoders = nn.ModuleDict({kind: codec[0] for kind, codec in codecs.items()})
        self.media_decoders = nn.ModuleDict({kind: codec[1] for kind, codec in codecs.items()})
        recurrent = config.backbone == "recurrent"
        init_weights(self, dataclasses.replace(config, n_layers=self.effective_layers()) if recurrent else config)
        for decoder in self.media_decoders.values():
            decoder.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embedding.tokens.weight

    def span_length(self, kind: str) -> int:
        """Latent positions of one span of `kind` (between its begin and end tokens)."""
        return num_positions(kind, self.config.media[kind])

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                media: Optional[dict] = None, past_key_values: Optional[SpanKVCache] = None,
                use_cache: bool = False, position_ids: Optional[torch.Tensor] = None,
                num_steps: Optional[int] = None) -> MultimodalOutput:
        """input_ids: (B, T); attention_mask: (B, cached + T), 1 = real token; media: kind → MediaSpans whose
        positions lie among the T new ones; past_key_values: a SpanKVCache from an earlier call; num_steps: the
        depth of a recurrent backbone (model/megatransformer_recurrent.py: resolve_depth when None)."""
        B, T = input_ids.shape
        if num_steps is not None and self.config.backbone != "recurrent":
            raise ValueError(f"num_steps={num_steps} needs a recurrent backbone, but config '{self.config.name}' has "
                             "backbone: causal")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.total_vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.total_vocab_size}) (text vocabulary "
                             f"{self.config.vocab_size} + begin/end tokens of {self.config.media_kinds}), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        media = media or {}
        cache = past_key_values if past_key_values is not None else (SpanKVCache() if use_cache else None)
        past_length = len(cache) if cache is not None else 0

        tokens = self.embedding.tokens(input_ids)
        span_ids = torch.zeros(B, T, dtype=torch.long, device=input_ids.device)
        next_id = cache.next_span_id() if cache is not None else 1
        placed = {}
        for kind, spans in media.items():
            if kind not in self.media_encoders:
                raise ValueError(f"the batch holds '{kind}' spans but config '{self.config.name}' models only "
                                 f"{', '.join(['text'] + self.config.media_kinds)}: use a config with '{kind}' in "
                                 "its media, or a cache without them")
            if len(spans) == 0:
                continue
            rows, columns = spans.positions(self.span_length(kind))
            if int(columns.min()) < 0 or int(columns.max()) >= T or int(rows.max()) >= B:
                raise ValueError(f"a '{kind}' span lies outside the (B, T) = {(B, T)} batch (rows "
                                 f"{rows[:, 0].tolist()}, starts {spans.starts.tolist()})")
            embedded = self.media_encoders[kind](spans.latents, spans.timesteps, spans.condition)
            tokens = tokens.index_put((rows, columns), embedded.to(tokens.dtype))
            if is_bidirectional(self.config.media[kind]):
                ids = torch.arange(next_id, next_id + len(spans), device=span_ids.device)
                span_ids = span_ids.index_put((rows, columns), ids[:, None].expand_as(rows))
                next_id += len(spans)
            placed[kind] = (rows, columns)
        all_span_ids = cache.extend_span_ids(span_ids) if cache is not None else span_ids

        x, attention_inputs = self.embedding(input_ids, attention_mask, position_ids, past_length,
                                             token_embeddings=tokens, span_ids=all_span_ids)
        token_mask = attention_mask[:, past_length:] if attention_mask is not None else None
        thinking_steps, iterations = None, 0
        if self.config.backbone == "recurrent":
            head = lambda hidden: self.lm_head(self.final_norm(hidden))  # noqa: E731
            x, thinking_steps, iterations, moe_terms = self.run_recurrent_depth(
                x, attention_inputs, cache, token_mask, num_steps, None, head, past_length)
        else:
            x, moe_terms = run_blocks(self.blocks, x, attention_inputs, cache, token_mask,
                                      self.gradient_checkpointing and self.training)
        hidden = self.final_norm(x)
        logits = self.lm_head(hidden)
        predictions = {kind: self.media_decoders[kind](hidden[rows, columns]) for kind, (rows, columns) in placed.items()}

        moe_losses, aux_loss = combine_moe_terms(moe_terms, self.config, logits)
        return MultimodalOutput(logits=logits, media=predictions, aux_loss=aux_loss, moe_losses=moe_losses,
                                past_key_values=cache if use_cache or past_key_values is not None else None,
                                thinking_steps=thinking_steps, num_steps=iterations)

    def num_parameters(self, exclude_embeddings: bool = False, active_only: bool = False) -> int:
        """Parameter count (see MegaTransformerCausalLM.num_parameters)."""
        blocks = self.blocks if self.config.backbone == "causal" else [*self.prelude, *self.core, *self.coda]
        return count_parameters(self, blocks, exclude_embeddings, active_only)


# ----- integration points: the family table, the loader and pretrain_wm.py's rule -----

def build_multimodal(config: MultimodalConfig) -> MegaTransformerMultimodal:
    """A freshly initialised multimodal model."""
    return MegaTransformerMultimodal(config)


def is_multimodal_config(name: str) -> bool:
    """pretrain_wm.py's rule "several modalities or a non-text one → multimodal": True for a YAML file in
    configs/multimodal/ or one that sets media or model_family: multimodal itself, for `multimodal/NAME`, and for a name found only in configs/multimodal/ (the names shared
    with configs/causal/, such as `tiny`, stay causal unless written `multimodal/tiny`)."""
    if name.startswith("multimodal/"):
        return True
    if Path(name).suffix in (".yaml", ".yml"):
        path = resolve_config_path(name)
        if path.resolve().parent == CONFIG_DIR / "multimodal":
            return True
        values = _load_yaml(path.read_text()) or {}  # its own keys: `extends` resolves by the family it selects
        return isinstance(values, dict) and (bool(values.get("media")) or values.get("model_family") == "multimodal")
    others = {path.stem for path in CONFIG_DIR.glob("*/*.yaml") if path.parent.name != "multimodal"}
    return name in lookup and name not in others


def resolve_multimodal_config(name: str) -> MultimodalConfig:
    """A multimodal config by `multimodal/NAME`, NAME, or YAML path."""
    return MultimodalConfig.from_name(name.removeprefix("multimodal/"))
