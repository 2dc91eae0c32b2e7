"""Recurrent-depth language model (Geiping et al. 2025, "Huginn"): prelude → core iterated r times → coda.

    model = MegaTransformerRecurrentLM(MegaTransformerConfig.from_name("recurrent_small"))
    out = model(input_ids, labels=input_ids)               # training: r sampled per step
    out = model.eval()(input_ids, num_steps=16)            # fixed depth; out.thinking_steps (B, T)
    out = model.eval()(input_ids)                          # adaptive exit under recurrent_exit_criteria
    tokens = model.generate(prompt_ids, max_new_tokens=20, num_steps=16)

Each iteration feeds adapter(state, e) to the core blocks, e being the prelude output. Training draws r
from a Poisson–log-normal distribution seeded by (depth_seed, step), so every rank draws the same r, and
backpropagates through the last `recurrent_backprop_depth` iterations only. Core layer j at iteration i
caches its keys and values under (layer index of j, i).

The backbone itself (prelude, adapter, core, coda, depth sampling, exit) is the RecurrentDepth mixin, which the
multimodal world model uses too (backbone: recurrent). `lookup` maps the name of every YAML file in
configs/recurrent/ to its config, parsed when looked up.
"""

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatransformer_utils import ConfigRegistry, MegaTransformerConfig
from model import generation
from model.megatransformer_causal import count_parameters, init_weights, shifted_cross_entropy
from model.recurrent_criteria import iterate_until_exit, make_criterion
from model.transformer.attention import KVCache
from model.transformer.block import GradientCheckpointing, TransformerBlock
from model.transformer.embedding import DecoderEmbedding
from model.transformer.moe import combine_moe_terms
from model.transformer.norms import make_norm

lookup = ConfigRegistry(MegaTransformerConfig, ("recurrent",))


@dataclass
class RecurrentLMOutput:
    """logits: (B, T, vocab_size); loss = cross-entropy + aux_loss when labels are given.
    thinking_steps: (B, T) long, the core iterations each token used; num_steps: iterations run in all."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    moe_losses: Optional[torch.Tensor] = None
    past_key_values: Optional[KVCache] = None
    thinking_steps: Optional[torch.Tensor] = None
    num_steps: int = 0


class RecurrentAdapter(nn.Module):
    """(state, e), each (B, T, H) → core input (B, T, H). sum: state + e; gate: g * state + (1 - g) * e with
    g = sigmoid(W [state; e]); linear: W [state; e]."""

    def __init__(self, config: MegaTransformerConfig):
        super().__init__()
        self.kind = config.recurrent_adapter
        H = config.hidden_size
        self.proj = nn.Linear(2 * H, H, bias=self.kind == "gate") if self.kind != "sum" else None

    def forward(self, state: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if self.kind == "sum":
            return state + e
        mixed = self.proj(torch.cat((state, e), dim=-1))
        if self.kind == "gate":
            gate = torch.sigmoid(mixed)
            return gate * state + (1 - gate) * e
        return mixed


class RecurrentDepth:
    """The recurrent-depth backbone, shared by the recurrent LM and the multimodal world model (backbone:
    recurrent): prelude blocks → (adapter → core blocks → core norm) × r → coda blocks. A class using it calls
    build_recurrent_layers(config) in its __init__ and run_recurrent_depth in its forward; it provides `config`,
    `gradient_checkpointing` and `training_steps_drawn`."""

    def build_recurrent_layers(self, config: MegaTransformerConfig) -> None:
        P, R, C = config.n_prelude_layers, config.n_recurrent_layers, config.n_coda_layers
        self.prelude = nn.ModuleList(TransformerBlock(config, i) for i in range(P))
        self.adapter = RecurrentAdapter(config)
        self.core = nn.ModuleList(TransformerBlock(config, P + i) for i in range(R))
        self.core_norm = make_norm(config)
        self.coda = nn.ModuleList(TransformerBlock(config, P + R + i) for i in range(C))
        self.depth_seed = 0  # with the step, seeds sample_num_steps; the same on every rank
        self.training_steps_drawn = 0  # training forwards that sampled their depth (the default step)
        self.generation_num_steps: Optional[int] = None  # depth used by generate(); None = config default

    def effective_layers(self) -> int:
        """Blocks a mean-depth forward pass runs (scales the residual initialisation)."""
        c = self.config
        return max(c.n_prelude_layers + c.n_coda_layers + c.n_recurrent_layers * c.recurrent_mean_thinking_steps, 1)

    # ----- depth -----
    def sample_num_steps(self, step: int, rank: int = 0) -> int:
        """r ~ 1 + Poisson(λ), log λ ~ N(log(mean - 1) - σ²/2, σ): E[r] = recurrent_mean_thinking_steps.
        Seeded by (depth_seed, step), so every rank (every model instance) draws the same r for a step; with
        config.recurrent_depth_per_rank the rank joins the seed and each rank draws its own."""
        c = self.config
        rank_offset = rank * 7_919 * 1_000_003 if c.recurrent_depth_per_rank else 0
        generator = torch.Generator().manual_seed(self.depth_seed * 1_000_003 + step + rank_offset)
        if c.recurrent_mean_thinking_steps <= 1:
            return 1
        sigma = c.recurrent_thinking_steps_sigma
        mu = torch.log(torch.tensor(float(c.recurrent_mean_thinking_steps - 1))) - sigma ** 2 / 2
        rate = torch.exp(mu + sigma * torch.randn((), generator=generator))
        return 1 + int(torch.poisson(rate.reshape(1), generator=generator).item())

    def initial_state(self, e: torch.Tensor) -> torch.Tensor:
        """e: (B, T, H) prelude output → the latent state before the first iteration (B, T, H)."""
        kind, std = self.config.recurrent_init_state, self.config.initializer_range
        if kind == "zero":
            return torch.zeros_like(e)
        if kind == "normal":
            return torch.randn_like(e)
        if kind == "like-init":
            return nn.init.trunc_normal_(torch.empty_like(e), 0.0, std, -3 * std, 3 * std)
        return e  # embed

    # ----- pieces -----
    def _run(self, block: TransformerBlock, x, inputs, cache, token_mask, cache_key, aux_terms):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            x, aux = checkpoint(block, x, inputs, cache, token_mask, cache_key, use_reentrant=False)
        else:
            x, aux = block(x, inputs, cache, token_mask, cache_key)
        if aux is not None:
            aux_terms.append(aux)
        return x

    def _core_step(self, state, e, inputs, cache, token_mask, step, past_length, aux_terms) -> torch.Tensor:
        """One iteration: state (B, T, H) → state (B, T, H). With a cache, step `step` of earlier positions that
        never ran so deep reuses their deepest cached step."""
        x = self.adapter(state, e)
        for block in self.core:
            key = (block.attn.layer_index, step)
            if cache is not None and past_length and key not in cache:
                k, v = cache.get((block.attn.layer_index, step - 1))
                cache.update(key, k[:, :, :past_length], v[:, :, :past_length])
            x = self._run(block, x, inputs, cache, token_mask, key, aux_terms)
        return self.core_norm(x)

    def _coda(self, state, inputs, cache, token_mask, aux_terms) -> torch.Tensor:
        """state (B, T, H) → the coda's output (B, T, H)."""
        x = state
        for block in self.coda:
            x = self._run(block, x, inputs, cache, token_mask, None, aux_terms)
        return x

    def resolve_depth(self, num_steps: Optional[int], exit_criteria: Optional[str]):
        """(iterations to run at most, exit criterion or None): a fixed num_steps; else generation_num_steps;
        else training samples r (sample_num_steps) and evaluation exits per token under `exit_criteria` (default
        config.recurrent_exit_criteria) within recurrent_max_thinking_steps, or runs recurrent_mean_thinking_steps
        when the criterion is "none"."""
        c = self.config
        if num_steps is None:
            num_steps = self.generation_num_steps
        criterion = None
        if num_steps is None and self.training:
            num_steps = self.sample_num_steps(self.training_steps_drawn)
            self.training_steps_drawn += 1
        elif num_steps is None:
            criterion = make_criterion(exit_criteria or c.recurrent_exit_criteria, c.recurrent_exit_criteria_threshold)
            num_steps = c.recurrent_max_thinking_steps if criterion is not None else c.recurrent_mean_thinking_steps
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        return num_steps, criterion

    def run_recurrent_depth(self, x: torch.Tensor, inputs, cache, token_mask, num_steps: Optional[int],
                            exit_criteria: Optional[str], head: Callable, past_length: int):
        """x: (B, T, H) embedded inputs → (coda output (B, T, H), thinking_steps (B, T), iterations, aux terms).
        head maps the coda output to logits, for the exit criterion's trial readouts."""
        c = self.config
        num_steps, criterion = self.resolve_depth(num_steps, exit_criteria)
        aux_terms: list[torch.Tensor] = []
        for block in self.prelude:
            x = self._run(block, x, inputs, cache, token_mask, None, aux_terms)
        e = x

        grad_from = num_steps - c.recurrent_backprop_depth  # earlier iterations run without autograd
        grad_enabled = torch.is_grad_enabled()

        def step(state: torch.Tensor, i: int) -> torch.Tensor:
            with torch.set_grad_enabled(grad_enabled and i >= grad_from):
                return self._core_step(state, e, inputs, cache, token_mask, i, past_length, aux_terms)

        def readout(state: torch.Tensor) -> torch.Tensor:
            logits = head(self._coda(state, inputs, cache, token_mask, []))
            if cache is not None:  # a trial decode: forget the coda's keys and values again
                for block in self.coda:
                    cache.truncate(block.attn.layer_index, past_length)
            return logits

        state = self.initial_state(e)
        state, thinking_steps, iterations = iterate_until_exit(step, state, num_steps, criterion, readout)
        if cache is not None:
            self._fill_deeper_steps(cache, iterations, past_length, x.shape[1])
        return self._coda(state, inputs, cache, token_mask, aux_terms), thinking_steps, iterations, aux_terms

    def _fill_deeper_steps(self, cache: KVCache, iterations: int, past_length: int, new_length: int) -> None:
        """Earlier calls may have cached more iterations than this one ran: give the new positions those steps
        too, holding their deepest computed keys and values (as a token that exited early)."""
        for block in self.core:
            layer = block.attn.layer_index
            step = iterations
            while (layer, step) in cache:
                k, v = cache.get((layer, iterations - 1))
                cache.update((layer, step), k[:, :, past_length:past_length + new_length],
                             v[:, :, past_length:past_length + new_length])
                step += 1


class MegaTransformerRecurrentLM(RecurrentDepth, GradientCheckpointing, nn.Module):
    """embedding → prelude blocks → (adapter → core blocks → core norm) × r → coda blocks → final norm → LM head."""

    def __init__(self, config: MegaTransformerConfig):
        super().__init__()
        self.config = config
        self.embedding = DecoderEmbedding(config)
        self.build_recurrent_layers(config)
        self.final_norm = make_norm(config, config.use_final_norm)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Residual projections scaled for the effective depth of a mean-depth forward pass.
        init_weights(self, replace(config, n_layers=self.effective_layers()))
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embedding.tokens.weight

    # ----- forward -----
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, past_key_values: Optional[KVCache] = None,
                use_cache: bool = False, position_ids: Optional[torch.Tensor] = None,
                num_steps: Optional[int] = None, exit_criteria: Optional[str] = None) -> RecurrentLMOutput:
        """input_ids: (B, T); attention_mask: (B, cached + T); labels: (B, T), -100 ignored.
        num_steps: a fixed depth; without it, see resolve_depth."""
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        past_length = len(cache) if cache is not None else 0
        x, inputs = self.embedding(input_ids, attention_mask, position_ids, past_length)
        token_mask = attention_mask[:, past_length:] if attention_mask is not None else None
        head = lambda hidden: self.lm_head(self.final_norm(hidden))  # noqa: E731
        hidden, thinking_steps, iterations, aux_terms = self.run_recurrent_depth(
            x, inputs, cache, token_mask, num_steps, exit_criteria, head, past_length)
        logits = head(hidden)

        moe_losses, aux_loss = combine_moe_terms(aux_terms, self.config, logits)
        loss = shifted_cross_entropy(logits, labels) + aux_loss if labels is not None else None
        return RecurrentLMOutput(logits=logits, loss=loss, aux_loss=aux_loss, moe_losses=moe_losses,
                                 past_key_values=cache if use_cache or past_key_values is not None else None,
                                 thinking_steps=thinking_steps, num_steps=iterations)

    def generate(self, input_ids: torch.Tensor, *args, num_steps: Optional[int] = None, **kwargs) -> torch.Tensor:
        """model.generation.generate at a fixed depth `num_steps` (None: the config's adaptive or mean depth)."""
        previous, self.generation_num_steps = self.generation_num_steps, num_steps
        try:
            return generation.generate(self, input_ids, *args, **kwargs)
        finally:
            self.generation_num_steps = previous

    # ----- size -----
    def num_parameters(self, exclude_embeddings: bool = False, active_only: bool = False) -> int:
        """Parameter count (each core weight once). exclude_embeddings drops token/position embeddings;
        active_only counts the k of n_experts experts each token uses."""
        return count_parameters(self, [*self.prelude, *self.core, *self.coda], exclude_embeddings, active_only)

    def flops_per_token(self, sequence_length: int, num_steps: Optional[int] = None, training: bool = True) -> float:
        """Matmul FLOPs per token at depth num_steps (default recurrent_mean_thinking_steps), counted as the
        causal LM does (2 per weight, 2 * T * (d_q + d_v) * n_heads per attention layer). Training adds a 2x
        backward pass for the prelude, coda, head and the last recurrent_backprop_depth iterations only."""
        c = self.config
        r = num_steps if num_steps is not None else c.recurrent_mean_thinking_steps
        core = sum(p.numel() for p in [*self.core.parameters(), *self.adapter.parameters(),
                                        *self.core_norm.parameters()])
        once = self.num_parameters(exclude_embeddings=True, active_only=True) - core
        if c.tie_word_embeddings:
            once += self.lm_head.weight.numel()
        if c.ffn_type == "moe":  # only active experts of the core count per iteration
            per_expert = sum(p[0].numel() for b in self.core for p in (b.ffn.experts_in, b.ffn.experts_out))
            core -= per_expert * (c.n_experts - c.n_experts_per_token)
        attention_layer = sequence_length * c.n_heads * (c.d_queries + c.d_values)
        outer_layers = c.n_prelude_layers + c.n_coda_layers

        def cost(iterations: int) -> float:
            return 2 * (once + iterations * core) + 2 * attention_layer * (outer_layers + iterations * c.n_recurrent_layers)

        forward = cost(r)
        return forward + 2 * cost(min(r, c.recurrent_backprop_depth)) if training else forward
