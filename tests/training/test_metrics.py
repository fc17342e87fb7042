"""Leave-one-out metrics: ranks, HR / NDCG / MRR, and the full and sampled protocols."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genrec.training.batch import SequenceBatch
from genrec.training.evaluate import evaluate_scores, popularity_scores
from genrec.training.metrics import EvalConfig, mask_scores, metrics_from_ranks, target_ranks
from genrec.training.sequences import Histories, Split

INF = float("inf")


def test_ties_count_against_the_target() -> None:
    scores = torch.tensor([
        [-INF, 1.0, 2.0, 2.0, 0.0],
        [-INF, 1.0, 2.0, 2.0, 0.0],
        [-INF, 5.0, 5.0, 5.0, 5.0],  # a constant scorer ranks the target last
        [-INF, 3.0, 2.0, 1.0, 0.0],
        [-INF, 3.0, -INF, 1.0, 0.0],  # an excluded item never ranks ahead
    ])
    targets = torch.tensor([2, 4, 1, 1, 4])
    assert target_ranks(scores, targets).tolist() == [1, 3, 3, 0, 2]
    assert target_ranks(scores, targets).dtype == torch.int64


def test_metrics_on_hand_computed_ranks() -> None:
    metrics = metrics_from_ranks(torch.tensor([0, 1, 9, 10, 300]))
    expected = {
        "HR@1": 1 / 5,
        "HR@10": 3 / 5,
        "HR@50": 4 / 5,
        "HR@200": 4 / 5,
        "NDCG@10": (1 + 1 / math.log2(3) + 1 / math.log2(11)) / 5,
        "NDCG@200": (1 + 1 / math.log2(3) + 1 / math.log2(11) + 1 / math.log2(12)) / 5,
        "MRR": (1 + 1 / 2 + 1 / 10 + 1 / 11 + 1 / 301) / 5,
    }
    assert metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=1e-12), name


def test_perfect_and_hopeless_rankings() -> None:
    assert metrics_from_ranks(torch.zeros(7, dtype=torch.long)) == {
        "HR@1": 1.0, "HR@10": 1.0, "HR@50": 1.0, "HR@200": 1.0, "NDCG@10": 1.0, "NDCG@200": 1.0, "MRR": 1.0}
    worst = metrics_from_ranks(torch.full((3,), 10_000))
    assert all(worst[k] == 0.0 for k in worst if k != "MRR") and worst["MRR"] == pytest.approx(1 / 10_001)


def test_history_kept_masks_only_padding() -> None:
    scores = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    history = torch.tensor([[3, 4, 0], [5, 0, 0]])
    masked = mask_scores(scores, history, torch.tensor([1, 2]), EvalConfig(exclude_history=False), torch.Generator())
    assert torch.isneginf(masked[:, 0]).all()
    assert torch.equal(masked[:, 1:], scores[:, 1:])
    assert torch.isfinite(scores).all()  # the input is not modified


def test_exclude_history_masks_history_but_keeps_a_repeated_target() -> None:
    scores = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    history = torch.tensor([[2, 3, 7, 0], [4, 4, 9, 5], [6, 0, 0, 0]])
    targets = torch.tensor([3, 8, 6])  # rows 0 and 2: the target was seen before
    masked = mask_scores(scores, history, targets, EvalConfig(exclude_history=True), torch.Generator())
    for row in range(3):
        seen = set(history[row].tolist()) - {0}
        for item in range(10):
            if item == int(targets[row]):
                assert masked[row, item] == scores[row, item]
            elif item == 0 or item in seen:
                assert masked[row, item] == -INF
            else:
                assert masked[row, item] == scores[row, item]
    # the target's rank among the unseen items only
    ranks = target_ranks(masked, targets)
    for row in range(3):
        rankable = torch.isfinite(masked[row])
        assert int(ranks[row]) == int((masked[row][rankable] > masked[row, targets[row]]).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_protocol_keeps_target_and_100_unseen_items(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    batch, num_items = 16, 300
    scores = torch.randn(batch, num_items + 1, generator=g)
    history = torch.randint(1, num_items + 1, (batch, 40), generator=g)
    history[::2, 30:] = 0  # padded rows
    targets = torch.randint(1, num_items + 1, (batch,), generator=g)
    targets[::3] = history[::3, 5]  # some targets repeat a history item
    config = EvalConfig(protocol="sampled", num_sampled_negatives=100)
    masked = mask_scores(scores, history, targets, config, torch.Generator().manual_seed(seed))

    finite = torch.isfinite(masked)
    assert (finite.sum(1) == 101).all()
    assert finite[torch.arange(batch), targets].all()
    assert torch.equal(masked[finite], scores[finite])  # kept items keep their scores
    assert not finite[:, 0].any()
    for row in range(batch):
        negatives = set(finite[row].nonzero().squeeze(1).tolist()) - {int(targets[row])}
        assert len(negatives) == 100
        assert not negatives & set(history[row].tolist())

    again = mask_scores(scores, history, targets, config, torch.Generator().manual_seed(seed))
    assert torch.equal(torch.isfinite(again), finite)  # seeded: the same negatives every evaluation
    other = mask_scores(scores, history, targets, config, torch.Generator().manual_seed(seed + 10))
    assert not torch.equal(torch.isfinite(other), finite)


def test_sampled_protocol_with_fewer_unseen_items_than_negatives() -> None:
    scores = torch.zeros(1, 21)
    history = torch.arange(1, 16)[None]  # items 1..15 seen, 16..20 unseen
    masked = mask_scores(scores, history, torch.tensor([3]), EvalConfig(protocol="sampled"),
                         torch.Generator().manual_seed(0))
    assert torch.isfinite(masked[0]).nonzero().squeeze(1).tolist() == [3, 16, 17, 18, 19, 20]


def test_describe_names_the_protocol() -> None:
    assert "100 random unseen" in EvalConfig(protocol="sampled").describe()
    assert EvalConfig().describe() == "full ranking, history excluded"  # the papers' protocol is the default
    assert EvalConfig(exclude_history=False).describe() == "full ranking, history kept"


def test_the_popularity_baseline_ranks_items_by_their_training_counts() -> None:
    """Item 3 has the most training events, item 2 the next most: users whose target is 3 rank it first;
    a user who already had item 3 finds item 2 first once the history is excluded."""
    train = Histories(np.array([1, 2, 3]), np.array([0, 2, 4, 5]), np.array([3, 2, 3, 2, 3]), np.zeros(5, np.int64),
                      np.zeros(5, np.int64))
    histories = Histories(np.array([1, 2]), np.array([0, 1, 2]), np.array([1, 3]), np.zeros(2, np.int64),
                          np.zeros(2, np.int64))
    split = Split(histories, np.array([3, 2]), np.zeros(2, np.int64), np.zeros(2, np.int64))
    scores = popularity_scores(train, num_items=4)
    assert evaluate_scores(scores, split, EvalConfig())["HR@1"] == 1.0
    assert evaluate_scores(scores, split, EvalConfig(exclude_history=False))["HR@1"] == 0.5


@pytest.mark.parametrize("protocol", ["full", "sampled"])
def test_the_protocols_leave_out_the_whole_history_not_only_the_models_cut(protocol: str) -> None:
    """A model reads only its most recent `max_len` events; the items before them are still the user's own, so
    neither protocol ranks them (nor draws them as negatives), as `recommend` leaves out the whole history.
    The scorer puts the oldest history item (1) first and the target (5) second."""
    histories = Histories(np.array([1]), np.array([0, 4]), np.array([1, 2, 3, 4]), np.arange(4), np.zeros(4, np.int64))
    split = Split(histories, np.array([5]), np.array([4]), np.zeros(1, np.int64))
    order = torch.tensor([0.0, 9.0, 1.0, 1.0, 1.0, 8.0, 0.5, 0.5, 0.5])  # ids 0..8; the history 1-4, target 5

    def scores(batch: SequenceBatch) -> torch.Tensor:
        assert batch.max_len == 2  # the model's cut
        return order.expand(batch.batch_size, -1)

    config = EvalConfig(protocol=protocol)  # type: ignore[arg-type]  # sampled: every unseen item is a negative
    assert evaluate_scores(scores, split, config, max_len=2)["HR@1"] == 1.0
    kept = evaluate_scores(scores, split, EvalConfig(exclude_history=False), max_len=2)
    assert kept["HR@1"] == 0.0 and kept["HR@10"] == 1.0  # history kept: item 1 ranks first
