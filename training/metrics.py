"""Leave-one-out ranking metrics: full ranking over the catalogue and the sampled protocol of SASRec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

HR_KS = (1, 10, 50, 200)
NDCG_KS = (10, 200)


@dataclass(frozen=True)
class EvalConfig:
    protocol: Literal["full", "sampled"] = "full"
    # The papers' protocol: the target is ranked against every item the user has not had, in all of the history
    # (the SASRec code's `rated = set(train[u])`, and what `recommend` leaves out); Meta's research/data/eval.py
    # (filter_invalid_ids=True) leaves out its model's input, the most recent max_len events, only. False keeps
    # the history items in the ranking.
    exclude_history: bool = True
    num_sampled_negatives: int = 100  # the SASRec paper's protocol
    seed: int = 0

    def describe(self) -> str:
        if self.protocol == "sampled":
            return f"sampled: target vs {self.num_sampled_negatives} random unseen items"
        return "full ranking, history excluded" if self.exclude_history else "full ranking, history kept"


def target_ranks(scores: Tensor, targets: Tensor) -> Tensor:
    """0-based rank of each target. scores (B, N+1) with -inf on excluded items, targets (B,) -> (B,) int64.

    Ties count against the target (an item scoring exactly as much ranks ahead of it), so a constant scorer
    gets no credit.
    """
    target_scores = scores.gather(1, targets[:, None])
    return (scores >= target_scores).sum(1) - 1


def metrics_from_ranks(ranks: Tensor) -> dict[str, float]:
    """HR@k, NDCG@k and MRR averaged over users. ranks (U,) 0-based."""
    ranks = ranks.double()
    out = {f"HR@{k}": float((ranks < k).double().mean()) for k in HR_KS}
    for k in NDCG_KS:
        out[f"NDCG@{k}"] = float(torch.where(ranks < k, 1.0 / torch.log2(ranks + 2.0), 0.0).mean())
    out["MRR"] = float((1.0 / (ranks + 1.0)).mean())
    return out


def mask_scores(scores: Tensor, history: Tensor, targets: Tensor, config: EvalConfig, generator: torch.Generator) -> Tensor:
    """Apply the protocol to full-catalogue scores (B, N+1); history (B, T): every item the user has had (the
    whole history, not the model's `max_len` cut of it), padded with 0."""
    scores = scores.clone()
    scores[:, 0] = float("-inf")  # padding is never an item
    if config.protocol == "sampled":
        return _keep_sampled(scores, history, targets, config.num_sampled_negatives, generator)
    if config.exclude_history:
        target_scores = scores.gather(1, targets[:, None])
        scores.scatter_(1, history, float("-inf"))
        scores.scatter_(1, targets[:, None], target_scores)  # a repeated item stays rankable
    return scores


def _keep_sampled(scores: Tensor, history: Tensor, targets: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """Keep the target and n uniformly drawn items outside the history and the target; -inf elsewhere."""
    b, width = scores.shape
    forbidden = torch.zeros(b, width, dtype=torch.bool, device=scores.device)
    forbidden[:, 0] = True
    forbidden.scatter_(1, history, True)
    forbidden.scatter_(1, targets[:, None], True)
    noise = torch.rand(b, width, generator=generator).to(scores.device)
    noise[forbidden] = 2.0  # sampled last
    negatives = noise.argsort(dim=1)[:, :n]
    keep = torch.zeros_like(forbidden)
    keep.scatter_(1, negatives, True)
    keep &= ~forbidden
    keep.scatter_(1, targets[:, None], True)
    return torch.where(keep, scores, torch.full_like(scores, float("-inf")))
