"""Causal language models: one decoder class switched by MegaTransformerConfig.

    model = MegaTransformerCausalLM(MegaTransformerConfig.from_name("modern_small"))
    out = model(input_ids, labels=input_ids)      # out.logits (B, T, V), out.loss
    tokens = model.generate(prompt_ids, max_new_tokens=20)

`lookup` maps the name of every YAML file in configs/causal/ (gpt2_small, modern_small, moe_small, ...) to its
config, parsed when looked up (`lookup.path(name)` is the file).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatransformer_utils import ConfigRegistry, MegaTransformerConfig
from model.generation import generate
from model.transformer.attention import KVCache
from model.transformer.block import GradientCheckpointing, TransformerBlock, run_blocks
from model.transformer.embedding import DecoderEmbedding
from model.transformer.moe import MixtureOfExperts, combine_moe_terms
from model.transformer.static_cache import StaticKVCache
from model.transformer.norms import make_norm

lookup = ConfigRegistry(MegaTransformerConfig, ("causal",))


@dataclass
class CausalLMOutput:
    """logits: (B, T, vocab_size). loss = cross-entropy + aux_loss (when labels are given).
    aux_loss: the weighted MoE terms (0 for dense models); moe_losses: unweighted (load_balancing, z) or None."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    moe_losses: Optional[torch.Tensor] = None
    past_key_values: Optional[KVCache] = None


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss: logits (B, T, V) at position t predict labels (B, T) at t + 1; -100 is ignored.
    The labels are shifted left and padded with -100 (as Hugging Face does) rather than the logits sliced,
    which would copy the (B, T - 1, V) logits forward and backward."""
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def init_weights(model: nn.Module, config: MegaTransformerConfig) -> None:
    """Normal(0, initializer_range) weights, zero biases, unit norms; residual output projections
    (attention o_proj, FFN fc_out, expert outputs) scaled by 1/sqrt(2 * n_layers) as in GPT-2."""
    std = config.initializer_range
    residual_std = std / (2 * config.n_layers) ** 0.5 if config.scale_residual_init else std
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            is_residual = name.endswith(("attn.o_proj", "ffn.fc_out"))
            nn.init.normal_(module.weight, 0.0, residual_std if is_residual else std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, MixtureOfExperts):
            nn.init.normal_(module.experts_in, 0.0, std)
            nn.init.normal_(module.experts_out, 0.0, residual_std)


def count_parameters(model: nn.Module, blocks, exclude_embeddings: bool, active_only: bool) -> int:
    """Parameters of a decoder with `model.embedding` and TransformerBlocks `blocks` (see num_parameters)."""
    total = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        total -= model.embedding.tokens.weight.numel()
        if model.embedding.positions is not None:
            total -= model.embedding.positions.weight.numel()
    if active_only and model.config.ffn_type == "moe":
        per_expert = sum(p[0].numel() for block in blocks for p in (block.ffn.experts_in, block.ffn.experts_out))
        total -= per_expert * (model.config.n_experts - model.config.n_experts_per_token)
    return total


class MegaTransformerCausalLM(GradientCheckpointing, nn.Module):
    """Decoder-only transformer LM: embedding → n_layers blocks → final norm → LM head."""

    def __init__(self, config: MegaTransformerConfig):
        super().__init__()
        self.config = config
        self.embedding = DecoderEmbedding(config)
        self.blocks = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.final_norm = make_norm(config, config.use_final_norm)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        init_weights(self, config)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embedding.tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, past_key_values: Optional[KVCache] = None,
                use_cache: bool = False, position_ids: Optional[torch.Tensor] = None) -> CausalLMOutput:
        """input_ids: (B, T); attention_mask: (B, cached + T), 1 = real token (left padding allowed);
        labels: (B, T) with -100 where no loss is wanted; past_key_values: a KVCache from an earlier call."""
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        past_length = len(cache) if cache is not None else 0
        x, attention_inputs = self.embedding(input_ids, attention_mask, position_ids, past_length)
        token_mask = attention_mask[:, past_length:] if attention_mask is not None else None

        x, moe_terms = run_blocks(self.blocks, x, attention_inputs, cache, token_mask,
                                  self.gradient_checkpointing and self.training)
        logits = self.lm_head(self.final_norm(x))

        moe_losses, aux_loss = combine_moe_terms(moe_terms, self.config, logits)
        loss = shifted_cross_entropy(logits, labels) + aux_loss if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=aux_loss, moe_losses=moe_losses,
                              past_key_values=cache if use_cache or past_key_values is not None else None)

    generate = generate

    def decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor,
                    slots: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """One step of decoding on a static cache, shape-stable so that torch.compile traces it once.

        input_ids, position_ids: (B, T) new tokens, written at cache slots `slots` (T,) of `cache`;
        key_mask: (B, S) 1 where a slot holds a real token (these T included) → logits (B, vocab_size) of
        the last new position."""
        x = self.embedding.embed(input_ids, position_ids)
        attention_inputs = self.embedding.static_cache_inputs(position_ids, key_mask, slots, x.dtype)
        writer = cache.at(slots)
        for block in self.blocks:
            x, _ = block(x, attention_inputs, writer)
        return self.lm_head(self.final_norm(x[:, -1]))

    def num_parameters(self, exclude_embeddings: bool = False, active_only: bool = False) -> int:
        """Parameter count. exclude_embeddings drops token/position embeddings (the LM head too when tied);
        active_only counts the k of n_experts experts each token actually uses."""
        return count_parameters(self, self.blocks, exclude_embeddings, active_only)

    def flops_per_token(self, sequence_length: int, training: bool = True) -> float:
        """Matmul FLOPs per token (PaLM appendix B): 2 per active non-embedding weight plus
        2 * n_layers * T * (d_queries + d_values) * n_heads for attention scores and mixing
        (causal attention is counted in full, as PaLM and nanoGPT do). Training (forward + backward) is 3x."""
        c = self.config
        weights = self.num_parameters(exclude_embeddings=True, active_only=True)
        if c.tie_word_embeddings:
            weights += self.lm_head.weight.numel()
        attention = c.n_layers * sequence_length * c.n_heads * (c.d_queries + c.d_values)
        forward = 2 * weights + 2 * attention
        return 3 * forward if training else forward
