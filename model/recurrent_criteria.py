"""Adaptive per-token exit for the recurrent-depth LM: when has a token thought enough?

    criterion = make_criterion("kl_divergence", threshold=5e-4)
    state, steps = iterate_until_exit(step, state, max_steps=64, criterion=criterion, readout=readout)

`step(state, i)` runs iteration i on the latent state (B, T, H); `readout(state)` decodes it to logits
(B, T, V) and is only called for the criteria that look at the output distribution. A token whose
criterion holds stops: its state is frozen (later iterations no longer change it) and `steps` (B, T)
counts the iterations it used. The loop ends when every token has stopped or at `max_steps`.

Criteria (each compares successive steps; `threshold` is the per-criterion tolerance):
- kl_divergence: KL(p_prev || p_now) of the output distributions < threshold
- entropy_diff: |H(p_now) - H(p_prev)| < threshold (nats)
- latent_diff: ||s_now - s_prev|| / ||s_now|| < threshold
- argmax_stability: the top token has not changed for k successive steps, k = int(threshold) when
  threshold >= 1, else k = ARGMAX_DEFAULT_STEPS
- cosine: 1 - cos(s_now, s_prev) < threshold
"""

from abc import ABC, abstractmethod
from typing import Callable, Optional

import torch

ARGMAX_DEFAULT_STEPS = 5
CRITERIA = ("kl_divergence", "entropy_diff", "latent_diff", "argmax_stability", "cosine")


class ExitCriterion(ABC):
    """Stateful: `update(state, logits)` → converged (B, T) bool, comparing with the previous call's values.
    The first call after `reset()` has nothing to compare with and reports no token as converged."""

    needs_logits = False

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        self.previous = None

    def update(self, state: torch.Tensor, logits: Optional[torch.Tensor]) -> torch.Tensor:
        current = self.summarise(state, logits)
        previous, self.previous = self.previous, current
        if previous is None:
            return torch.zeros(state.shape[:2], dtype=torch.bool, device=state.device)
        return self.converged(previous, current)

    @abstractmethod
    def summarise(self, state: torch.Tensor, logits: Optional[torch.Tensor]):
        """What is kept from one step to compare with the next."""

    @abstractmethod
    def converged(self, previous, current) -> torch.Tensor:
        """(B, T) bool: tokens whose summary changed less than the threshold."""


class KLDivergence(ExitCriterion):
    needs_logits = True

    def summarise(self, state, logits):
        return logits.float().log_softmax(-1)

    def converged(self, previous, current):
        return (previous.exp() * (previous - current)).sum(-1) < self.threshold


class EntropyDiff(ExitCriterion):
    needs_logits = True

    def summarise(self, state, logits):
        log_p = logits.float().log_softmax(-1)
        return -(log_p.exp() * log_p).sum(-1)

    def converged(self, previous, current):
        return (current - previous).abs() < self.threshold


class LatentDiff(ExitCriterion):
    def summarise(self, state, logits):
        return state.float()

    def converged(self, previous, current):
        return (current - previous).norm(dim=-1) / current.norm(dim=-1).clamp_min(1e-12) < self.threshold


class Cosine(ExitCriterion):
    def summarise(self, state, logits):
        return state.float()

    def converged(self, previous, current):
        return 1 - torch.nn.functional.cosine_similarity(current, previous, dim=-1) < self.threshold


class ArgmaxStability(ExitCriterion):
    """Converged once the argmax token is the same for `patience` successive comparisons."""

    needs_logits = True

    def __init__(self, threshold: float):
        self.patience = int(threshold) if threshold >= 1 else ARGMAX_DEFAULT_STEPS
        super().__init__(threshold)

    def reset(self) -> None:
        super().reset()
        self.unchanged = None

    def summarise(self, state, logits):
        return logits.argmax(-1)

    def converged(self, previous, current):
        same = current == previous
        self.unchanged = same.long() if self.unchanged is None else (self.unchanged + 1) * same
        return self.unchanged >= self.patience


_CLASSES = {"kl_divergence": KLDivergence, "entropy_diff": EntropyDiff, "latent_diff": LatentDiff,
            "argmax_stability": ArgmaxStability, "cosine": Cosine}


def make_criterion(name: str, threshold: float) -> Optional[ExitCriterion]:
    """The criterion called `name`, or None for "none" (always run the full number of steps)."""
    if name == "none":
        return None
    if name not in _CLASSES:
        raise ValueError(f"unknown exit criterion '{name}': valid are none, {', '.join(CRITERIA)}")
    return _CLASSES[name](threshold)


def iterate_until_exit(step: Callable[[torch.Tensor, int], torch.Tensor], state: torch.Tensor, max_steps: int,
                       criterion: Optional[ExitCriterion] = None,
                       readout: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """state: (B, T, H) → (final state (B, T, H), steps used per token (B, T) long, iterations run).
    Without a criterion every token runs max_steps iterations."""
    B, T = state.shape[:2]
    steps = torch.zeros(B, T, dtype=torch.long, device=state.device)
    active = torch.ones(B, T, dtype=torch.bool, device=state.device)
    if criterion is not None:
        criterion.reset()
    iterations = 0
    for i in range(max_steps):
        new_state = step(state, i)
        state = torch.where(active[..., None], new_state, state) if criterion is not None else new_state
        steps += active
        iterations = i + 1
        if criterion is None:
            continue
        logits = readout(state) if criterion.needs_logits else None
        active = active & ~criterion.update(state, logits)
        if not bool(active.any()):
            break
    return state, steps, iterations
