"""Training objectives: sampled softmax for retrieval, a target-aware listwise loss for the ranking head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from genrec.training.batch import SequenceBatch
from genrec.training.hstu import HSTU, KVCache


@dataclass(frozen=True)
class LossConfig:
    # "full": softmax cross-entropy over the whole catalogue (SASRec+, Klenitskiy & Vasilev 2023), the stronger
    # objective where the catalogue fits; "sampled": sampled softmax (the HSTU paper's); "auto": full up to
    # `full_max_items` items, sampled beyond
    kind: Literal["auto", "full", "sampled"] = "auto"
    full_max_items: int = 100_000
    num_negatives: int = 128  # sampled: uniform negatives shared by the batch
    in_batch_negatives: bool = False  # sampled: also the batch's own targets (Meta's ML-1M recipe: uniform only)
    temperature: float = 0.05
    # leave the items already in the history out of each position's softmax (the target itself stays): neither
    # `recommend` nor the default protocol ranks them, so the objective need not spend itself pushing them down
    # (off with `genrec train --keep-history`, whose protocol ranks them)
    exclude_seen: bool = True
    # cut points per batch for the ranking objective, spread evenly over its sequences (>= 1 each); each cut
    # copies its history's K/V, so this bounds the objective's memory whatever the batch size
    rank_cut_points: int = 256
    rank_hard_negatives: int = 16  # drawn from the current retrieval top-`rank_hard_pool`
    rank_hard_pool: int = 100
    rank_uniform_negatives: int = 16
    rank_weight: float = 1.0
    rating_weight: float = 0.5  # the second task: does the user rate the true next item highly
    # what "highly" means: ratings >= this; None = the upper half of the log's own scale (above the midpoint of
    # its lowest and highest rating: 4 and 5 of MovieLens's 1-5, 8-10 of a 1-10 scale); a log with one rating
    # value (implicit feedback) has none
    high_rating: float | None = None


def high_ratings(action_values: np.ndarray, config: LossConfig) -> np.ndarray:
    """(A,) the rating value of each action id 1..A -> (A + 1,) bool per action id, 0 (unknown) never high."""
    values = np.asarray(action_values, dtype=np.float64)
    if config.high_rating is not None:
        high = values >= config.high_rating
    elif len(values):
        high = values > (values.min() + values.max()) / 2
    else:
        high = np.zeros(0, dtype=bool)
    return np.concatenate([[False], high])


def next_item_targets(batch: SequenceBatch) -> tuple[Tensor, Tensor]:
    """Position t predicts item t+1. Returns targets (B, T) and mask (B, T) of positions with a target."""
    targets = torch.zeros_like(batch.items)
    targets[:, :-1] = batch.items[:, 1:]
    mask = batch.valid_mask() & (targets != 0)
    return targets, mask


@dataclass(frozen=True)
class SeenItems:
    """Which items each training position has already had: the events up to and including it."""

    items: Tensor  # (B, T) the batch's item ids, right-padded with 0
    mask: Tensor  # (B, T) the positions with a target (`next_item_targets`), the loss's rows in order

    def among(self, candidates: Tensor) -> Tensor:
        """(M,) item ids -> (P, M) bool: the candidate is in the history of the loss's row p."""
        b, t = self.items.shape
        steps = torch.arange(t, device=self.items.device).expand(b, t)
        ids = int(max(int(candidates.max()), int(self.items.max()))) + 1
        if ids <= t * candidates.numel():  # the whole catalogue (full softmax): each id's first position, scattered
            table = torch.full((b, ids), t, dtype=torch.long, device=steps.device)
            first = table.scatter_reduce_(1, self.items, steps, "amin")[:, candidates]  # (B, M)
        else:  # a few negatives of a large catalogue: compare them with the events, B·T·M
            first = torch.where(self.items[..., None] == candidates, steps[..., None], t).amin(1)
        return (first[:, None, :] <= steps[0, None, :, None])[self.mask]


def uses_full_softmax(config: LossConfig, num_items: int) -> bool:
    return config.kind == "full" or (config.kind == "auto" and num_items <= config.full_max_items)


def describe_loss(config: LossConfig, num_items: int) -> str:
    seen = ", the history's items left out" if config.exclude_seen else ""
    if uses_full_softmax(config, num_items):
        return f"full softmax over {num_items:,} items{seen}"
    extra = " and in-batch" if config.in_batch_negatives else ""
    return f"sampled softmax, {config.num_negatives} uniform{extra} negatives of {num_items:,} items{seen}"


def retrieval_loss(
    user: Tensor, targets: Tensor, item_table: Tensor, config: LossConfig, generator: torch.Generator,
    seen: SeenItems | None = None,
) -> Tensor:
    """The next-item objective. user (P, D) L2-normalised, targets (P,) dense ids, item_table (N+1, D),
    seen: each row's history, whose items are no class of that row (its target excepted) -> scalar."""
    if uses_full_softmax(config, item_table.shape[0] - 1):
        return full_softmax_loss(user, targets, item_table, config, seen)
    return sampled_softmax_loss(user, targets, item_table, config, generator, seen)


def full_softmax_loss(
    user: Tensor, targets: Tensor, item_table: Tensor, config: LossConfig, seen: SeenItems | None = None
) -> Tensor:
    """Cross-entropy over every item (row 0, padding, is never a class). Shapes as in `retrieval_loss`."""
    logits = (user / config.temperature) @ item_table[1:].T  # (P, N), the step's largest tensor: scaled via (P, D)
    if seen is not None:
        items = torch.arange(1, item_table.shape[0], device=targets.device)
        masked = seen.among(items).scatter_(1, (targets - 1)[:, None], False)  # a repeated target stays
        # In place and unrecorded: the softmax gives a -inf logit zero gradient already, so autograd need not
        # mask (and copy) the (P, N) gradient again; the matmul's backward reads its inputs, not this output.
        with torch.no_grad():
            logits.masked_fill_(masked, float("-inf"))
    return F.cross_entropy(logits, targets - 1)


def sampled_softmax_loss(
    user: Tensor, targets: Tensor, item_table: Tensor, config: LossConfig, generator: torch.Generator,
    seen: SeenItems | None = None,
) -> Tensor:
    """Sampled softmax. Shapes as in `retrieval_loss`.

    Negatives are uniform items shared by the batch, plus (`in_batch_negatives`) the batch's distinct targets;
    a negative equal to the row's own target, or `seen` in its row, is masked out rather than counted as wrong.
    """
    num_items = item_table.shape[0] - 1
    uniform = torch.randint(1, num_items + 1, (config.num_negatives,), generator=generator).to(targets.device)
    negatives = torch.cat([uniform, targets.unique()]) if config.in_batch_negatives else uniform  # (M,)
    user = user / config.temperature  # (P, D): cheaper than scaling the (P, 1 + M) logits
    positive_logits = (user * item_table[targets]).sum(-1, keepdim=True)  # (P, 1)
    negative_logits = user @ item_table[negatives].T  # (P, M)
    negative_logits.masked_fill_(negatives[None, :] == targets[:, None], float("-inf"))
    if seen is not None:
        negative_logits.masked_fill_(seen.among(negatives), float("-inf"))
    logits = torch.cat([positive_logits, negative_logits], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(targets))


def ranking_loss(
    model: HSTU,
    batch: SequenceBatch,
    user: Tensor,
    cache: KVCache,
    high_rating: Tensor,
    config: LossConfig,
    generator: torch.Generator,
) -> Tensor:
    """Target-aware objective for the candidate scorer.

    For random cut points c of each sequence, the history is events [0, c) (read from the full forward's
    cache, exact because layers are causal), the true event c is the positive candidate, and negatives are
    the current retrieval's hard negatives (never the user's own items) plus uniform items. Loss = listwise
    softmax over the candidates (task 0) + BCE of "rated highly" on the positive (task 1, only where the
    action is known).
    user (B, T, D) per-prefix user embeddings; high_rating (num_actions,) bool per action id.
    """
    device = batch.items.device
    eligible = (batch.lengths >= 2).nonzero().squeeze(1)
    if eligible.numel() == 0:
        return user.sum() * 0.0
    rows = eligible.repeat_interleave(max(1, config.rank_cut_points // eligible.numel()))  # (P,)
    span = (batch.lengths[rows] - 1).float()
    cuts = 1 + (torch.rand(rows.shape[0], generator=generator).to(device) * span).long()  # c in [1, len-1]
    positives = batch.items[rows, cuts]
    history_user = user[rows, cuts - 1]  # (P, D)
    table = model.item_table()
    with torch.no_grad():
        retrieval = history_user @ table.T
        retrieval[:, 0] = float("-inf")
        # the user's own items are neither served (recommend excludes the history) nor fair negatives
        retrieval.scatter_(1, batch.items[rows], float("-inf"))
        pool = retrieval.topk(min(config.rank_hard_pool, table.shape[0] - 1), dim=1).indices
        pick = torch.randint(0, pool.shape[1], (rows.shape[0], config.rank_hard_negatives), generator=generator)
        hard = pool.gather(1, pick.to(device))
    uniform = torch.randint(1, table.shape[0], (rows.shape[0], config.rank_uniform_negatives), generator=generator)
    candidates = torch.cat([positives[:, None], hard, uniform.to(device)], dim=1)  # (P, 1 + M)
    request_time = batch.timestamps[rows, cuts - 1]
    # Only the ranking head learns from this loss. The encoder is shared with retrieval and trained by the
    # retrieval loss alone: letting this loss pull it too slowed retrieval's learning on short histories, and
    # without its backward pass through the candidate tokens a training step is cheaper.
    history_user = history_user.detach()
    with torch.no_grad():
        states = model.candidate_states(cache.select(rows).with_lengths(cuts), candidates, request_time)
    logits = model.head(states, history_user, candidates, request_time)
    # The served score holds the retrieval logit, whose item embeddings are retrieval's: its gradient is
    # cancelled, so hard negatives here cannot pull the retrieval embeddings around.
    retrieval = model.retrieval_logits(history_user, F.normalize(model.items(candidates), dim=-1))
    engagement = logits[..., 0] - retrieval + retrieval.detach()
    accidental = (candidates[:, 1:] == positives[:, None])
    engagement = torch.cat([engagement[:, :1], engagement[:, 1:].masked_fill(accidental, float("-inf"))], dim=1)
    loss = config.rank_weight * F.cross_entropy(engagement, torch.zeros_like(positives))
    actions = batch.actions[rows, cuts]
    known = actions != 0
    if config.rating_weight > 0 and bool(known.any()):
        labels = high_rating[actions].float()
        rating_logit = logits[:, 0, 1]
        loss = loss + config.rating_weight * F.binary_cross_entropy_with_logits(rating_logit[known], labels[known])
    return loss
