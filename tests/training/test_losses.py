"""The retrieval objectives and the FLOP count the speed tables use."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genrec.training.batch import SequenceBatch
from genrec.training.flops import encoder_forward_flops, train_step_flops
from genrec.training.hstu import HSTUConfig
from genrec.training.losses import (
    LossConfig,
    SeenItems,
    Targets,
    full_softmax_loss,
    high_ratings,
    next_events,
    next_item_targets,
    retrieval_loss,
    uses_full_softmax,
)
from genrec.training.sasrec import SASRecConfig
from genrec.training.sequences import Histories


def test_full_softmax_is_cross_entropy_over_every_item_and_never_the_padding() -> None:
    g = torch.Generator().manual_seed(0)
    table = F.normalize(torch.randn(8, 4, generator=g), dim=-1)  # 7 items + padding row 0
    user = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    targets = torch.tensor([1, 7, 3, 3, 5])
    config = LossConfig(kind="full", temperature=0.1)
    logits = user @ table.T / 0.1
    expected = -(logits.gather(1, targets[:, None]).squeeze(1) - logits[:, 1:].logsumexp(dim=1)).mean()
    assert torch.allclose(full_softmax_loss(user, Targets.one_each(targets), table, config), expected, atol=1e-6)
    # padding as a class would change the normaliser: moving row 0 must not move the loss
    moved = table.clone()
    moved[0] = user[0]
    assert torch.allclose(full_softmax_loss(user, Targets.one_each(targets), moved, config), expected, atol=1e-6)
    assert torch.allclose(retrieval_loss(user, targets, table, config, g), expected, atol=1e-6)


def test_seen_items_are_each_positions_history_and_leave_the_softmax_but_a_repeated_target_stays() -> None:
    items = torch.tensor([[3, 1, 3, 2, 0], [2, 4, 0, 0, 0]])  # right-padded; row 0 repeats item 3
    batch = SequenceBatch(items=items, timestamps=torch.zeros_like(items), actions=torch.zeros_like(items),
                          lengths=torch.tensor([4, 2]))
    targets, mask = next_item_targets(batch)
    seen = SeenItems(batch.items, mask)
    assert targets[mask].tolist() == [1, 3, 2, 4]
    assert seen.among(torch.tensor([4, 2])).tolist() == [[False, False], [False, False], [False, False], [False, True]]
    assert seen.among(torch.arange(1, 5)).tolist() == [[False, False, True, False],  # history (3) -> 1
                             [True, False, True, False],  # (3, 1) -> 3, a repeat
                             [True, False, True, False],  # (3, 1, 3) -> 2
                             [False, True, False, False]]  # (2) -> 4
    g = torch.Generator().manual_seed(0)
    table = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    user = F.normalize(torch.randn(4, 4, generator=g), dim=-1).requires_grad_()
    config = LossConfig(kind="full", temperature=0.5)
    logits = user @ table[1:].T / 0.5
    # every row keeps its target; the repeated 3 of row 1 is its target, so only item 1 leaves that row
    keep = ~seen.among(torch.arange(1, 5)).scatter(1, (targets[mask] - 1)[:, None], False)
    expected = -torch.stack([logits[r, t - 1] - logits[r][keep[r]].logsumexp(0)
                             for r, t in enumerate(targets[mask].tolist())]).mean()
    loss = retrieval_loss(user, targets[mask], table, config, g, seen)
    assert torch.allclose(loss, expected, atol=1e-6)
    # and so is its gradient: a left-out item pulls no row
    (grad,), (expected_grad,) = torch.autograd.grad(loss, user), torch.autograd.grad(expected, user)
    assert torch.allclose(grad, expected_grad, atol=1e-6) and grad.abs().sum() > 0
    # sampled: a drawn negative in the row's history counts as no negative at all
    one_hot = torch.eye(5)
    sampled = LossConfig(kind="sampled", num_negatives=32, temperature=1.0)
    row = SeenItems(torch.tensor([[2, 0]]), torch.tensor([[True, False]]))  # item 2 seen; the user is item 1
    loss = retrieval_loss(one_hot[1:2], torch.tensor([1]), one_hot, sampled, torch.Generator().manual_seed(0), row)
    drawn = torch.randint(1, 5, (32,), generator=torch.Generator().manual_seed(0))
    others = int(((drawn == 3) | (drawn == 4)).sum())
    assert loss.item() == pytest.approx(float(torch.log1p(torch.tensor(others * torch.e**-1.0))), abs=1e-5)


def test_a_windows_earlier_events_are_seen_at_every_position_of_it() -> None:
    """A training window of a longer history: the items before it are the user's at each of its positions,
    whether the candidates are the catalogue (scattered) or a few negatives of a large one (compared)."""
    items, mask = torch.tensor([[3, 1, 0]]), torch.tensor([[True, False, False]])
    seen = SeenItems(items, mask, earlier=torch.tensor([[5, 2, 0]]))  # the user had 5 and 2 before the window
    assert seen.among(torch.arange(1, 7)).tolist() == [[False, True, True, False, True, False]]
    assert seen.among(torch.tensor([2, 4, 1000])).tolist() == [[True, False, False]]  # ids > S+T * M: compared
    # a window's batch carries them, and the loss leaves them out
    histories = Histories(np.array([7]), np.array([0, 4]), np.array([5, 2, 3, 1]), np.arange(4), np.zeros(4, np.int64))
    batch = histories.cut(np.array([0]), np.array([2]), np.array([4]))
    assert batch.items.tolist() == [[3, 1]] and batch.earlier is not None and batch.earlier.tolist() == [[5, 2]]
    assert batch.seen_items().tolist() == [[5, 2, 3, 1]]


def rows_of(targets: Targets) -> list[list[int]]:
    rows: list[list[int]] = [[] for _ in range(targets.num_rows)]
    for row, item in zip(targets.rows.tolist(), targets.items.tolist(), strict=True):
        rows[row].append(item)
    return rows


def test_events_tied_in_time_are_each_a_target_of_the_positions_before_them() -> None:
    # user 0: items 1, 2 at t=10, then 3, 4, 5 at t=20; user 1: 6, 7 at t=5, 6 (no ties)
    batch = SequenceBatch.from_lists([[1, 2, 3, 4, 5], [6, 7]], [[10, 10, 20, 20, 20], [5, 6]])
    next_only = LossConfig(horizon=1)
    mask, tied = next_events(batch, next_only)
    assert mask.tolist() == next_item_targets(batch)[1].tolist()
    # after 1: 2 (its tie); after 2: the next time's 3, 4, 5; after 3: 4 and 5; after 4: 5; after 6: 7
    assert rows_of(tied) == [[2], [3, 4, 5], [4, 5], [5], [7]]
    assert tied.weights.tolist() == pytest.approx([1, 1 / 3, 1 / 3, 1 / 3, 1 / 2, 1 / 2, 1, 1])
    _, untied = next_events(batch, replace(next_only, tied_targets=False))
    assert untied.items.tolist() == [2, 3, 4, 5, 7] and untied.rows.tolist() == list(range(5))
    # a log without ties gives the next event alone either way
    strict = SequenceBatch.from_lists([[1, 2, 3], [4, 5]], [[1, 2, 3], [1, 2]])
    assert next_events(strict, next_only)[1].items.tolist() == next_events(
        strict, replace(next_only, tied_targets=False))[1].items.tolist()


def test_a_horizon_adds_the_later_events_sharing_the_later_weight() -> None:
    """Up to `horizon` events ahead: the next event (and its ties) keep 1 - later_weight, the later ones share
    later_weight; a row with no later event keeps all of its weight on the next."""
    batch = SequenceBatch.from_lists([[1, 2, 3, 4, 5], [6, 7]], [[10, 10, 20, 20, 20], [5, 6]])
    config = LossConfig(horizon=3, later_weight=0.4)
    _, targets = next_events(batch, config)
    # after 1: its tie 2, then 3 and 4 (3 events ahead); after 2: 3, 4, 5 all tied, nothing later; after 3:
    # 4, 5 tied; after 4: 5; after 6: 7
    assert rows_of(targets) == [[2, 3, 4], [3, 4, 5], [4, 5], [5], [7]]
    assert targets.weights.tolist() == pytest.approx([0.6, 0.2, 0.2, 1 / 3, 1 / 3, 1 / 3, 1 / 2, 1 / 2, 1, 1])
    assert torch.allclose(targets.of_rows(torch.ones_like(targets.weights)), torch.ones(5))
    assert targets.items[targets.first()].tolist() == [2, 3, 4, 5, 7]  # each row's first pair is its next event
    _, untied = next_events(batch, replace(config, tied_targets=False))
    assert rows_of(untied) == [[2, 3, 4], [3, 4, 5], [4, 5], [5], [7]]
    assert untied.weights.tolist() == pytest.approx([0.6, 0.2, 0.2, 0.6, 0.2, 0.2, 0.6, 0.4, 1, 1])
    with pytest.raises(ValueError, match="horizon must be at least 1"):
        LossConfig(horizon=0)
    with pytest.raises(ValueError, match="later_weight"):
        LossConfig(later_weight=1.0)


@pytest.mark.parametrize("kind", ["full", "sampled"])
def test_a_position_with_tied_targets_takes_the_mean_of_their_losses(kind: str) -> None:
    """A row's loss is the mean of one loss per target (the expected loss over the ties' possible orders); in
    the sampled softmax, a drawn negative that is another of the row's targets counts as no negative."""
    g = torch.Generator().manual_seed(0)
    table = F.normalize(torch.randn(7, 4, generator=g), dim=-1)  # 6 items
    user = F.normalize(torch.randn(2, 4, generator=g), dim=-1)
    config = LossConfig(kind=kind, num_negatives=12, temperature=0.5)  # type: ignore[arg-type]
    tied = Targets(torch.tensor([0, 0, 0, 1]), torch.tensor([2, 5, 6, 3]), torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))
    loss = retrieval_loss(user, tied, table, config, torch.Generator().manual_seed(1))
    logits = user @ table.T / 0.5
    if kind == "full":
        expected = [logits[r, 1:].logsumexp(0) - logits[r, i] for r, i in [(0, 2), (0, 5), (0, 6), (1, 3)]]
    else:
        drawn = torch.randint(1, 7, (12,), generator=torch.Generator().manual_seed(1))
        first = drawn[~torch.isin(drawn, torch.tensor([2, 5, 6]))]  # row 0's other targets are no negatives
        second = drawn[drawn != 3]
        expected = [torch.cat([logits[r, i, None], logits[r, neg]]).logsumexp(0) - logits[r, i]
                    for r, i, neg in [(0, 2, first), (0, 5, first), (0, 6, first), (1, 3, second)]]
    assert loss.item() == pytest.approx(float((sum(expected[:3]) / 3 + expected[3]) / 2), abs=1e-5)


def test_auto_takes_the_full_softmax_only_where_the_catalogue_fits() -> None:
    auto = LossConfig(kind="auto", full_max_items=1000)
    assert uses_full_softmax(auto, 1000) and not uses_full_softmax(auto, 1001)
    assert uses_full_softmax(LossConfig(kind="full", full_max_items=10), 10**6)
    assert not uses_full_softmax(LossConfig(kind="sampled"), 10)


@pytest.mark.parametrize("in_batch", [False, True])
def test_sampled_softmax_counts_each_drawn_negative_and_in_batch_targets_only_when_asked(in_batch: bool) -> None:
    table = torch.eye(3)  # padding, item 1, item 2: orthogonal, so a negative's logit is 0 and the target's 1
    user, targets = table[1:], torch.tensor([1, 2])
    config = LossConfig(kind="sampled", num_negatives=64, temperature=1.0, in_batch_negatives=in_batch)
    loss = retrieval_loss(user, targets, table, config, torch.Generator().manual_seed(0))
    drawn = torch.randint(1, 3, (64,), generator=torch.Generator().manual_seed(0))
    # a negative equal to the row's target is masked; in-batch adds the other row's target once
    other = [int((drawn == 2).sum()) + in_batch, int((drawn == 1).sum()) + in_batch]
    expected = sum(float(torch.log1p(torch.tensor(k * torch.e**-1.0))) for k in other) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_flops_count_the_matmuls_by_hand() -> None:
    hstu = HSTUConfig(num_items=100, d_model=8, num_layers=2, num_heads=2, d_qk=4, d_v=4)
    # per layer and token: uvqk 2*8*2*(8+8) = 512, output 2*8*8 = 128; attention 2*n^2*2*(4+4)
    n = 3
    assert encoder_forward_flops(hstu, batch=1, length=n) == 2 * (n * 640 + 2 * n * n * 16)
    sasrec = SASRecConfig(num_items=100, d_model=8, num_layers=1)
    assert encoder_forward_flops(sasrec, batch=2, length=n) == 2 * (n * (2 * 8 * 32 + 4 * 64) + 2 * n * n * 16)
    batch = SequenceBatch.from_lists([[1, 2, 3], [4, 5]])  # 3 positions with a next item
    full = train_step_flops(hstu, LossConfig(kind="full"), batch)
    sampled = train_step_flops(hstu, LossConfig(kind="sampled", num_negatives=10), batch)
    assert full - sampled == 3 * 2 * 3 * 8 * (100 - 10)  # fwd + bwd of the logits over 100 vs 10 classes


def test_high_ratings_follow_the_logs_own_scale() -> None:
    default = LossConfig()
    assert high_ratings(np.array([1.0, 2, 3, 4, 5]), default).tolist() == [False, False, False, False, True, True]
    assert high_ratings(np.array([1.0, 4, 7, 10]), default).tolist() == [False, False, False, True, True]
    assert high_ratings(np.array([1.0]), default).tolist() == [False, False]  # implicit feedback: none high
    assert high_ratings(np.array([], dtype=np.float64), default).tolist() == [False]
    chosen = LossConfig(high_rating=3)
    assert high_ratings(np.array([1.0, 2, 3, 4, 5]), chosen).tolist() == [False, False, False, True, True, True]
