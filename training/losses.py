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
    # Events with the same timestamp have no order between them (a log lists them in some arbitrary order): a
    # position's targets are its next event and the later events tied with it, each weighted 1 / their count,
    # the expected loss over their orders. Without ties it is the next event alone. Only for logs with time.
    tied_targets: bool = True
    # A position also predicts the events after its next one, up to `horizon` events ahead: its next event (and
    # those tied with it) keep 1 - `later_weight` of its weight and the later ones share `later_weight`, so the
    # user embedding also points at what comes a few events on (the dense all-action idea of PinnerFormer,
    # Pancha et al. 2022). 1: the next event alone, as the HSTU and SASRec papers train. Not the default: 5 (with
    # later_weight 0.3) raised HSTU's full-ranking HR@10 and NDCG@10 on MovieLens-100K (SASRec's HR@10) and
    # lowered both models' on short histories (README)
    horizon: int = 1
    later_weight: float = 0.3
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

    def __post_init__(self) -> None:
        if self.horizon < 1:
            raise ValueError(f"horizon must be at least 1 (the next event), got {self.horizon}")
        if not 0 <= self.later_weight < 1:
            raise ValueError(f"later_weight must be in [0, 1): the next event keeps the rest, got {self.later_weight}")


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
class Targets:
    """The loss rows' target items, flat: pair q is item ``items[q]`` of row ``rows[q]``, weighted ``weights[q]``
    (each row's weights sum to 1). A row has several where its next events are tied in time (`next_events`)."""

    rows: Tensor  # (Q,) int64, ascending
    items: Tensor  # (Q,) int64 dense ids
    weights: Tensor  # (Q,) float

    @staticmethod
    def one_each(items: Tensor) -> Targets:
        """One target per row: items (P,)."""
        rows = torch.arange(items.shape[0], device=items.device)
        return Targets(rows, items, torch.ones(items.shape, device=items.device))

    def of_rows(self, values: Tensor) -> Tensor:
        """values (Q,) -> (P,) each row's weighted sum, for `num_rows` = P rows."""
        return torch.zeros(self.num_rows, dtype=values.dtype, device=values.device).index_add_(
            0, self.rows, values * self.weights)

    def first(self) -> Tensor:
        """(P,) each row's first pair, its next event."""
        starts = torch.ones_like(self.rows, dtype=torch.bool)
        starts[1:] = self.rows[1:] != self.rows[:-1]
        return starts.nonzero().squeeze(1)

    @property
    def num_rows(self) -> int:
        return int(self.rows[-1]) + 1 if self.rows.numel() else 0


def next_events(batch: SequenceBatch, config: LossConfig) -> tuple[Tensor, Targets]:
    """The positions with a next event (B, T) (`next_item_targets`) and, per such position in order, its targets:
    the next event; with `tied_targets` also every later event with that event's timestamp; with a `horizon`
    above 1 also the events after those up to `horizon` events ahead, weighted as `LossConfig` says."""
    targets, mask = next_item_targets(batch)
    if (not config.tied_targets and config.horizon <= 1) or not bool(mask.any()):
        return mask, Targets.one_each(targets[mask])
    b, t = batch.items.shape
    steps = torch.arange(t, device=mask.device)
    if config.tied_targets:
        valid = batch.valid_mask()
        last_of_run = torch.ones_like(valid)  # an event whose successor is not tied with it
        last_of_run[:, :-1] = (batch.timestamps[:, 1:] != batch.timestamps[:, :-1]) | ~valid[:, 1:]
        run_end = torch.where(last_of_run, steps, t).flip(1).cummin(1).values.flip(1)  # (B, T) its run's last event
        end = torch.full_like(run_end, -1)
        end[:, :-1] = run_end[:, 1:]  # position i's next events: i+1 .. the end of event i+1's run
    else:
        end = (steps + 1).expand(b, t)
    last = torch.minimum(torch.maximum(end, steps + config.horizon), batch.lengths[:, None] - 1)  # (B, T)
    k = int((last - steps)[mask].max())
    after = steps[:, None] + 1 + torch.arange(k, device=mask.device)  # (T, K) the events after each position
    following = (after[None] <= end[:, :, None])[mask]  # (P, K) the next events
    later = ((after[None] > end[:, :, None]) & (after[None] <= last[:, :, None]))[mask]  # (P, K)
    count = later.sum(1)
    share = torch.where(count > 0, config.later_weight, 0.0)  # (P,) the later events' part of the row's weight
    weights = torch.where(following, ((1 - share) / following.sum(1))[:, None], (share / count.clamp(min=1))[:, None])
    rows, column = (following | later).nonzero(as_tuple=True)  # column 0, the next event, first in each row
    items = batch.items[:, after.clamp(max=t - 1)][mask][rows, column]
    return mask, Targets(rows, items, weights[rows, column])


@dataclass(frozen=True)
class SeenItems:
    """Which items each training position has already had: the events up to and including it, and the events
    before the row (`SequenceBatch.earlier`: a window of a longer history)."""

    items: Tensor  # (B, T) the batch's item ids, right-padded with 0
    mask: Tensor  # (B, T) the positions with a target (`next_item_targets`), the loss's rows in order
    earlier: Tensor | None = None  # (B, S) item ids of the events before each row, right-padded with 0

    def among(self, candidates: Tensor) -> Tensor:
        """(M,) item ids -> (P, M) bool: the candidate is in the history of the loss's row p."""
        b, t = self.items.shape
        items, steps = self.items, torch.arange(t, device=self.items.device).expand(b, t)
        if self.earlier is not None:  # had before every position: as if at step 0
            items = torch.cat([self.earlier, items], dim=1)
            steps = torch.cat([torch.zeros_like(self.earlier), steps], dim=1)
        ids = int(max(int(candidates.max()), int(items.max()))) + 1
        if ids <= items.shape[1] * candidates.numel():  # the whole catalogue (full softmax): first positions, scattered
            table = torch.full((b, ids), t, dtype=torch.long, device=steps.device)
            first = table.scatter_reduce_(1, items, steps, "amin")[:, candidates]  # (B, M)
        else:  # a few negatives of a large catalogue: compare them with the events, B·(S+T)·M
            first = torch.where(items[..., None] == candidates, steps[..., None], t).amin(1)
        return (first[:, None, :] <= torch.arange(t, device=steps.device)[None, :, None])[self.mask]


def uses_full_softmax(config: LossConfig, num_items: int) -> bool:
    return config.kind == "full" or (config.kind == "auto" and num_items <= config.full_max_items)


def describe_loss(config: LossConfig, num_items: int) -> str:
    seen = ", the history's items left out" if config.exclude_seen else ""
    seen += ", events tied in time as one set of targets" if config.tied_targets else ""
    seen += f", the events up to {config.horizon} ahead as targets too" if config.horizon > 1 else ""
    if uses_full_softmax(config, num_items):
        return f"full softmax over {num_items:,} items{seen}"
    extra = " and in-batch" if config.in_batch_negatives else ""
    return f"sampled softmax, {config.num_negatives} uniform{extra} negatives of {num_items:,} items{seen}"


def retrieval_loss(
    user: Tensor, targets: Tensor | Targets, item_table: Tensor, config: LossConfig, generator: torch.Generator,
    seen: SeenItems | None = None,
) -> Tensor:
    """The next-item objective. user (P, D) L2-normalised, targets (P,) dense ids or each row's `Targets`,
    item_table (N+1, D), seen: each row's history, whose items are no class of that row (its targets excepted)
    -> scalar: the mean over rows of each row's weighted loss over its targets."""
    if isinstance(targets, Tensor):
        targets = Targets.one_each(targets)
    if uses_full_softmax(config, item_table.shape[0] - 1):
        return full_softmax_loss(user, targets, item_table, config, seen)
    return sampled_softmax_loss(user, targets, item_table, config, generator, seen)


def full_softmax_loss(
    user: Tensor, targets: Targets, item_table: Tensor, config: LossConfig, seen: SeenItems | None = None
) -> Tensor:
    """Cross-entropy over every item (row 0, padding, is never a class). Arguments as in `retrieval_loss`."""
    logits = (user / config.temperature) @ item_table[1:].T  # (P, N), the step's largest tensor: scaled via (P, D)
    classes = (targets.rows, targets.items - 1)
    if seen is not None:
        items = torch.arange(1, item_table.shape[0], device=user.device)
        masked = seen.among(items).index_put_(classes, torch.tensor(False, device=user.device))  # a repeated target stays
        # In place and unrecorded: the softmax gives a -inf logit zero gradient already, so autograd need not
        # mask (and copy) the (P, N) gradient again; the matmul's backward reads its inputs, not this output.
        with torch.no_grad():
            logits.masked_fill_(masked, float("-inf"))
    # A row's loss, the weighted mean of its targets' cross-entropies, is the cross-entropy of its first target
    # plus how far the others' logits fall below the first's: the one (P, N) pass stays PyTorch's fused one
    # (a logsumexp and a gather over the logits cost a 1M-event epoch 40% more).
    own = (user[targets.rows] * item_table[targets.items]).sum(-1) / config.temperature  # (Q,)
    first = targets.first()
    return F.cross_entropy(logits, targets.items[first] - 1) + targets.of_rows(own[first][targets.rows] - own).mean()


def sampled_softmax_loss(
    user: Tensor, targets: Targets, item_table: Tensor, config: LossConfig, generator: torch.Generator,
    seen: SeenItems | None = None,
) -> Tensor:
    """Sampled softmax: each target against the row's negatives. Arguments as in `retrieval_loss`.

    Negatives are uniform items shared by the batch, plus (`in_batch_negatives`) the batch's distinct targets;
    a negative that is one of the row's targets, or `seen` in its row, is masked out rather than counted as wrong.
    """
    num_items = item_table.shape[0] - 1
    uniform = torch.randint(1, num_items + 1, (config.num_negatives,), generator=generator).to(user.device)
    negatives = torch.cat([uniform, targets.items.unique()]) if config.in_batch_negatives else uniform  # (M,)
    user = user / config.temperature  # (P, D): cheaper than scaling the (P, M) logits
    positive_logits = (user[targets.rows] * item_table[targets.items]).sum(-1)  # (Q,)
    negative_logits = user @ item_table[negatives].T  # (P, M)
    # (row, item) pairs as one key each: a row's negative is one of its targets where its key is among theirs
    pairs = (targets.rows * (num_items + 1) + targets.items).sort().values
    keys = torch.arange(user.shape[0], device=user.device)[:, None] * (num_items + 1) + negatives[None, :]
    found = pairs[torch.searchsorted(pairs, keys).clamp(max=pairs.numel() - 1)] == keys
    negative_logits.masked_fill_(found, float("-inf"))
    if seen is not None:
        negative_logits.masked_fill_(seen.among(negatives), float("-inf"))
    negatives_lse = torch.logsumexp(negative_logits, 1)[targets.rows]  # (Q,)
    return targets.of_rows(torch.logaddexp(positive_logits, negatives_lse) - positive_logits).mean()


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
        retrieval.scatter_(1, batch.seen_items()[rows], float("-inf"))
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
