"""Evaluate a model on held-out next items: retrieval (full or sampled ranking) and the two-stage pipeline."""

from __future__ import annotations

import torch
from torch import nn

from genrec.training.hstu import HSTU
from genrec.training.metrics import EvalConfig, mask_scores, metrics_from_ranks, target_ranks
from genrec.training.sequences import Split


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, config: EvalConfig, batch_size: int = 256) -> dict[str, float]:
    """Leave-one-out metrics of the retrieval score <user, item> under `config`'s protocol."""
    model.eval()
    device = next(model.parameters()).device
    table = model.item_table()  # type: ignore[operator]
    generator = torch.Generator().manual_seed(config.seed)
    ranks = []
    for chunk in data.to_batches(batch_size, model.config.max_len):  # type: ignore[union-attr]
        batch, targets = chunk.history.to(device), chunk.target_items.to(device)
        scores = model.user_embedding(batch) @ table.T  # type: ignore[operator]
        ranks.append(target_ranks(mask_scores(scores, batch.items, targets, config, generator), targets))
    return metrics_from_ranks(torch.cat(ranks).cpu())


@torch.no_grad()
def evaluate_two_stage(
    model: HSTU, data: Split, config: EvalConfig, retrieve_k: int = 100, batch_size: int = 128
) -> dict[str, float]:
    """The served pipeline: retrieve top-`retrieve_k` by <user, item>, re-rank them with the candidate scorer.

    A target outside the retrieved set counts as a miss (ranked after all retrieved items); ranks inside it
    come from the scorer. Same masking protocol as `evaluate` (full ranking only).
    """
    if config.protocol != "full":
        raise ValueError("the two-stage pipeline is evaluated under the full-ranking protocol")
    model.eval()
    device = next(model.parameters()).device
    table = model.item_table()
    generator = torch.Generator().manual_seed(config.seed)
    ranks = []
    for chunk in data.to_batches(batch_size, model.config.max_len):
        batch, targets = chunk.history.to(device), chunk.target_items.to(device)
        cache, user = model.prefill(batch)
        scores = mask_scores(user @ table.T, batch.items, targets, config, generator)
        candidates = scores.topk(retrieve_k, dim=1).indices  # (B, R)
        rerank = model.score_candidates(cache, user, candidates)[..., 0]
        hit = candidates == targets[:, None]
        target_score = torch.where(hit, rerank, float("-inf")).max(dim=1).values
        inside = (rerank >= target_score[:, None]).sum(1) - 1
        ranks.append(torch.where(hit.any(1), inside, torch.full_like(inside, table.shape[0])))
    return metrics_from_ranks(torch.cat(ranks).cpu())
