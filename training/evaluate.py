"""Evaluate a model on held-out next items: retrieval (full or sampled ranking) and the two-stage pipeline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from genrec.training.batch import SequenceBatch
from genrec.training.hstu import HSTU
from genrec.training.metrics import EvalConfig, mask_scores, metrics_from_ranks, target_ranks
from genrec.training.sasrec import SASRec
from genrec.training.sequences import Histories, Split


def evaluate(model: HSTU | SASRec, data: Split, config: EvalConfig, batch_size: int = 256) -> dict[str, float]:
    """Leave-one-out metrics of the retrieval score <user, item> under `config`'s protocol."""
    return metrics_from_ranks(retrieval_ranks(model, data, config, batch_size))


def retrieval_ranks(model: HSTU | SASRec, data: Split, config: EvalConfig, batch_size: int = 256) -> Tensor:
    """Each user's target rank (U,) under the retrieval score <user, item> and `config`'s protocol."""
    device = next(model.parameters()).device
    return target_ranks_of(retrieval_scorer(model), data, config, model.config.max_len, batch_size, device)


@torch.no_grad()  # the item table: built once, without a graph, whoever calls
def retrieval_scorer(model: HSTU | SASRec) -> Callable[[SequenceBatch], Tensor]:
    """Histories (B, T) -> the retrieval logits <user, item> / temperature (B, N+1): the catalogue's log-softmax
    up to a constant per user, so different models' logits can be averaged (`ensemble_scorer`)."""
    model.eval()
    device = next(model.parameters()).device
    table = model.item_table()

    def scores(batch: SequenceBatch) -> Tensor:
        user = torch.empty(batch.batch_size, table.shape[1], device=device)
        for rows in batch.length_groups():  # exact either way; bounds the padding and the attention's memory
            user[rows] = model.user_embedding(batch.select(rows))
        return user @ table.T / model.config.temperature

    return scores


def ensemble_scorer(models: list[HSTU | SASRec]) -> Callable[[SequenceBatch], Tensor]:
    """The mean of several models' retrieval logits: the geometric mean of their next-item distributions."""
    scorers = [retrieval_scorer(model) for model in models]
    return lambda batch: torch.stack([scores(batch) for scores in scorers]).mean(0)


def popularity_scores(train: Histories, num_items: int) -> Callable[[SequenceBatch], Tensor]:
    """The popularity baseline: every user gets the items' training-event counts (N+1,) as scores."""
    counts = torch.from_numpy(np.bincount(train.items, minlength=num_items + 1).astype(np.float32))
    return lambda batch: counts.to(batch.items.device).expand(batch.batch_size, -1)


def evaluate_scores(
    scores: Callable[[SequenceBatch], Tensor], data: Split, config: EvalConfig, max_len: int | None = None,
    batch_size: int = 256, device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Leave-one-out metrics of any scorer: histories (B, T) -> scores (B, N+1), under `config`'s protocol."""
    return metrics_from_ranks(target_ranks_of(scores, data, config, max_len, batch_size, device))


@torch.no_grad()
def target_ranks_of(
    scores: Callable[[SequenceBatch], Tensor], data: Split, config: EvalConfig, max_len: int | None = None,
    batch_size: int = 256, device: torch.device | str = "cpu",
) -> Tensor:
    """Each user's target rank (U,) (0 = first) under any scorer and `config`'s protocol."""
    generator = torch.Generator().manual_seed(config.seed)
    ranks = []
    for chunk in data.to_batches(batch_size, max_len):
        batch, targets = chunk.history.to(device), chunk.target_items.to(device)
        ranks.append(target_ranks(mask_scores(scores(batch), batch.seen_items(), targets, config, generator), targets))
    return torch.cat(ranks).cpu()


@dataclass(frozen=True)
class Reranked:
    """One batch of the two-stage pipeline: retrieved candidates (B, R), their retrieval logits / temperature
    and the ranking head's correction (B, R) (served score = retrieval + correction), the targets (B,)."""

    candidates: Tensor
    retrieval: Tensor
    correction: Tensor
    targets: Tensor

    def ranks(self, weight: float = 1.0) -> Tensor:
        """Target ranks under retrieval + weight * correction; a target outside the candidates ranks last."""
        scores = self.retrieval + weight * self.correction
        hit = self.candidates == self.targets[:, None]
        target_score = torch.where(hit, scores, float("-inf")).max(dim=1).values
        inside = (scores >= target_score[:, None]).sum(1) - 1
        return torch.where(hit.any(1), inside, torch.full_like(inside, 1 << 40))


@torch.no_grad()
def rerank(model: HSTU, data: Split, config: EvalConfig, retrieve_k: int = 100, batch_size: int = 128) -> list[Reranked]:
    """Retrieve top-`retrieve_k` by <user, item> (under `config`'s masking), score them with the candidate scorer."""
    if config.protocol != "full":
        raise ValueError("the two-stage pipeline is evaluated under the full-ranking protocol")
    model.eval()
    device = next(model.parameters()).device
    table = model.item_table()
    generator = torch.Generator().manual_seed(config.seed)
    out = []
    for chunk in data.to_batches(batch_size, model.config.max_len):
        whole, all_targets = chunk.history.to(device), chunk.target_items.to(device)
        for rows in whole.length_groups():
            batch, targets = whole.select(rows), all_targets[rows]
            cache, user = model.prefill(batch)
            scores = mask_scores(user @ table.T, batch.seen_items(), targets, config, generator)
            candidates = scores.topk(retrieve_k, dim=1).indices  # (B, R)
            served = model.score_candidates(cache, user, candidates)[..., 0]
            retrieval = model.retrieval_logits(user, table[candidates])
            out.append(Reranked(candidates, retrieval, served - retrieval, targets))
    return out


def evaluate_two_stage(
    model: HSTU, data: Split, config: EvalConfig, retrieve_k: int = 100, batch_size: int = 128
) -> dict[str, float]:
    """The served pipeline: retrieve top-`retrieve_k` by <user, item>, re-rank them with the candidate scorer.

    A target outside the retrieved set counts as a miss (ranked after all retrieved items); ranks inside it
    come from the scorer. Same masking protocol as `evaluate` (full ranking only).
    """
    parts = rerank(model, data, config, retrieve_k, batch_size)
    return metrics_from_ranks(torch.cat([p.ranks() for p in parts]).cpu())


@torch.no_grad()
def evaluate_scorer_sampled(model: HSTU, data: Split, config: EvalConfig, batch_size: int = 256) -> dict[str, float]:
    """The sampled protocol's candidates (the target and its drawn negatives) ranked by the candidate scorer,
    as `rank` would serve them: the two-stage pipeline's second stage under the sampled protocol."""
    if config.protocol != "sampled":
        raise ValueError("evaluate_scorer_sampled takes the sampled protocol")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    ranks = []
    for chunk in data.to_batches(batch_size, model.config.max_len):
        batch, targets = chunk.history.to(device), chunk.target_items.to(device)
        # the draw `evaluate` makes with the same batch size: the same negatives
        kept = mask_scores(torch.zeros(batch.batch_size, model.config.num_items + 1, device=device),
                           batch.seen_items(), targets, config, generator).isfinite()
        candidates = kept.float().topk(min(config.num_sampled_negatives + 1, kept.shape[1]), dim=1).indices
        real = kept.gather(1, candidates)  # a row with fewer eligible items than asked has some padding
        scores = torch.empty(candidates.shape, device=device)
        for rows in batch.length_groups():  # as `evaluate`: bounds the padding and the attention's memory
            cache, user = model.prefill(batch.select(rows))
            scores[rows] = model.score_candidates(cache, user, candidates[rows])[..., 0]
        position = (candidates == targets[:, None]).float().argmax(dim=1)  # the target's column
        ranks.append(target_ranks(scores.masked_fill(~real, float("-inf")), position))
    return metrics_from_ranks(torch.cat(ranks).cpu())
