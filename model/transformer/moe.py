"""Mixture of experts (Switch / Mixtral style): a top-k softmax router over `n_experts` feed-forward experts.

Every token goes to its k best experts (no capacity limit, so none is dropped) and the outputs are
mixed with the router probabilities renormalised over those k. Two auxiliary losses are returned:

- load balancing (Switch eq. 4, Mixtral): n_experts * sum_e f_e * P_e, where f_e is the share of
  routing assignments that went to expert e (summed over the k choices) and P_e the mean router
  probability of e; it equals k when routing is perfectly uniform.
- router z-loss (ST-MoE): mean over tokens of logsumexp(router logits)^2.
Padding tokens (token_mask = 0) are left out of both.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatransformer_utils import MegaTransformerConfig
from model.transformer.ffn import activate


class MixtureOfExperts(nn.Module):
    """x: (B, T, hidden_size) → (out (B, T, hidden_size), aux (2,) = [load_balancing_loss, z_loss])."""

    def __init__(self, config: MegaTransformerConfig):
        super().__init__()
        self.n_experts = config.n_experts
        self.top_k = config.n_experts_per_token
        self.activation = config.intermediate_activation
        width = config.intermediate_size * (2 if config.is_gated else 1)
        self.router = nn.Linear(config.hidden_size, config.n_experts, bias=False)
        # Expert weights stacked along dim 0, laid out like nn.Linear weights (out_features, in_features).
        self.experts_in = nn.Parameter(torch.empty(config.n_experts, width, config.hidden_size))
        self.experts_out = nn.Parameter(torch.empty(config.n_experts, config.hidden_size, config.intermediate_size))

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, H = x.shape
        tokens = x.reshape(-1, H)
        logits = self.router(tokens)
        probs = logits.float().softmax(dim=-1)
        top_probs, top_experts = probs.topk(self.top_k, dim=-1)
        top_weights = (top_probs / top_probs.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = self._dispatch(tokens, top_experts, top_weights)
        return out.view(B, T, H), self._aux_losses(logits, probs, top_experts, token_mask)

    def _dispatch(self, tokens: torch.Tensor, top_experts: torch.Tensor, top_weights: torch.Tensor) -> torch.Tensor:
        """tokens: (N, H), top_experts/top_weights: (N, k) → (N, H), each token's experts mixed by weight."""
        flat_experts = top_experts.reshape(-1)
        order = flat_experts.argsort(stable=True)
        token_of_assignment = order // self.top_k
        counts = torch.bincount(flat_experts, minlength=self.n_experts).tolist()
        outputs = []
        for expert, chunk in zip(range(self.n_experts), token_of_assignment.split(counts)):
            if chunk.numel() == 0:
                continue
            hidden = activate(self.activation, F.linear(tokens[chunk], self.experts_in[expert]))
            outputs.append(F.linear(hidden, self.experts_out[expert]))
        weighted = torch.cat(outputs) * top_weights.reshape(-1)[order, None]
        return torch.zeros_like(tokens).index_add_(0, token_of_assignment, weighted)

    def _aux_losses(self, logits, probs, top_experts, token_mask) -> torch.Tensor:
        weights = torch.ones(probs.shape[0], device=probs.device) if token_mask is None else token_mask.reshape(-1).float()
        n_tokens = weights.sum().clamp(min=1.0)
        assignments = F.one_hot(top_experts, self.n_experts).float().sum(dim=1)  # (N, E)
        share_routed = (assignments * weights[:, None]).sum(0) / n_tokens
        mean_prob = (probs * weights[:, None]).sum(0) / n_tokens
        load_balancing = self.n_experts * (share_routed * mean_prob).sum()
        z_loss = (torch.logsumexp(logits.float(), dim=-1).square() * weights).sum() / n_tokens
        return torch.stack((load_balancing, z_loss))


def combine_moe_terms(moe_terms: list[torch.Tensor], config: MegaTransformerConfig,
                      like: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """The MoE layers' (2,) auxiliary terms → (moe_losses: their mean [load_balancing, z], or None when there are
    none; aux_loss: moe_aux_loss_weight * load_balancing + moe_z_loss_weight * z, a float32 zero scalar on `like`'s
    device for a dense model)."""
    moe_losses = torch.stack(moe_terms).mean(0) if moe_terms else None
    aux_loss = (config.moe_aux_loss_weight * moe_losses[0] + config.moe_z_loss_weight * moe_losses[1]
                if moe_losses is not None else like.new_zeros((), dtype=torch.float32))
    return moe_losses, aux_loss
