"""Sequences, vocabulary, actions, leave-one-out and batching."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from genrec.training.batch import SequenceBatch
from genrec.training.datasets import Interactions, load_ml100k
from genrec.training.sequences import (
    PreprocessConfig,
    SequenceData,
    build_sequences,
    leave_one_out,
)
from genrec.training.trainer import PRESETS, TrainConfig, train_set_batches
from genrec.training.vocabulary import Vocabulary, action_ids


def make_log(
    user: list[int] | list[str],
    item: list[int] | list[str],
    timestamp: list[int],
    rating: list[float] | None = None,
    item_features: pd.DataFrame | None = None,
) -> Interactions:
    def ids(values: list[int] | list[str]) -> np.ndarray:
        return np.array(values, dtype=object if isinstance(values[0], str) else np.int64)

    return Interactions(
        user=ids(user),
        item=ids(item),
        timestamp=np.array(timestamp, dtype=np.int64),
        rating=None if rating is None else np.array(rating, dtype=np.float32),
        name="test",
        item_features=item_features,
    )


def raw_sequence(data: SequenceData, u: int) -> list[int]:
    return data.item_vocab.to_raw(data.sequence(u)[0]).tolist()


@pytest.fixture(scope="module")
def ml100k() -> SequenceData:
    return build_sequences(load_ml100k())


def test_ml100k_sequences_and_leave_one_out(ml100k: SequenceData) -> None:
    assert len(ml100k.users) == 943 and len(ml100k.item_vocab) == 1682 and len(ml100k.items) == 100_000
    same_user = np.repeat(np.arange(943), ml100k.lengths())
    within = same_user[1:] == same_user[:-1]
    assert np.all(np.diff(ml100k.timestamps)[within] >= 0)  # time-ordered per user
    assert ml100k.num_actions == 6 and ml100k.actions.min() == 1
    assert ml100k.item_genres.shape == (1683, len(ml100k.genre_names)) and ml100k.item_genres[0].sum() == 0
    toy_story = int(ml100k.item_vocab.to_dense(np.array([1]))[0][0])
    assert ml100k.item_titles[toy_story] == "Toy Story"
    assert ml100k.year_values[ml100k.item_years[toy_story] - 1] == 1995
    assert ml100k.item_genres[toy_story, ml100k.genre_names.index("Animation")] == 1

    split = leave_one_out(ml100k)
    assert len(split.test) == len(split.valid) == 943
    last = ml100k.offsets[1:] - 1
    np.testing.assert_array_equal(split.test.target_items, ml100k.items[last])
    np.testing.assert_array_equal(split.valid.target_items, ml100k.items[last - 1])
    np.testing.assert_array_equal(split.test.histories.lengths(), ml100k.lengths() - 1)
    np.testing.assert_array_equal(split.train.lengths(), ml100k.lengths() - 2)


@pytest.mark.parametrize("scale", [1, 10**9])  # a span past 2**32 takes the two-sort path
def test_equal_timestamps_keep_log_order(scale: int) -> None:
    log = make_log(
        [2, 1, 1, 1, 1, 1, 2], [7, 30, 10, 20, 40, 50, 8], [s * scale for s in [0, 5, 5, 5, 1, 9, 0]]
    )
    data = build_sequences(log, PreprocessConfig(min_user_interactions=3))
    assert raw_sequence(data, 0) == [40, 30, 10, 20, 50]


def test_users_sorted_and_sequences_grouped_from_a_shuffled_log() -> None:
    log = make_log([2, 1, 2, 1, 2, 1], [1, 2, 3, 4, 5, 6], [3, 3, 1, 1, 2, 2])
    data = build_sequences(log, PreprocessConfig(min_user_interactions=3))
    assert data.users.tolist() == [1, 2]
    assert raw_sequence(data, 0) == [4, 6, 2] and raw_sequence(data, 1) == [3, 5, 1]


def test_min_interaction_filters() -> None:
    # user 1: 5 events, user 2: 4 events, user 3: 3 events; item 99 is seen once
    log = make_log([1] * 5 + [2] * 4 + [3] * 3, [1, 2, 3, 4, 99, 1, 2, 3, 4, 1, 2, 3], list(range(12)))
    data = build_sequences(log)  # min_user_interactions=5
    assert data.users.tolist() == [1] and data.item_vocab.raw_ids.tolist() == [1, 2, 3, 4, 99]
    data = build_sequences(log, PreprocessConfig(min_user_interactions=4, min_item_interactions=2))
    assert data.users.tolist() == [1, 2] and 99 not in data.item_vocab.raw_ids  # user 1 keeps 4 events
    with pytest.raises(ValueError, match=">= 3"):
        PreprocessConfig(min_user_interactions=2)
    with pytest.raises(ValueError, match="no user has 6 or more"):
        build_sequences(log, PreprocessConfig(min_user_interactions=6))


@pytest.mark.parametrize(
    "raw", [np.array([30, 10, 20], dtype=np.int64), np.array(["b", "a", "c"], dtype=object)]
)
def test_vocabulary_round_trip(raw: np.ndarray) -> None:
    vocab = Vocabulary(np.sort(raw))
    assert len(vocab) == 3 and vocab.num_embeddings == 4
    dense, known = vocab.to_dense(raw)
    assert known.all() and dense.dtype == np.int64 and sorted(dense.tolist()) == [1, 2, 3]
    np.testing.assert_array_equal(vocab.to_raw(dense), raw)


def test_vocabulary_unknown_ids() -> None:
    ints = Vocabulary(np.array([10, 20, 30], dtype=np.int64))
    dense, known = ints.to_dense(np.array([20, 5, 31, 30]))
    assert dense.tolist() == [2, 0, 0, 3] and known.tolist() == [True, False, False, True]
    dense, known = ints.to_dense(np.array(["20", "x", "20.5"], dtype=object))  # text sent for integer ids
    assert dense.tolist() == [2, 0, 0] and known.tolist() == [True, False, False]
    strs = Vocabulary(np.array(["a", "c"], dtype=object))
    dense, known = strs.to_dense(np.array(["c", "b", "zz"], dtype=object))
    assert dense.tolist() == [2, 0, 0] and known.tolist() == [True, False, False]
    with pytest.raises(ValueError, match="0 is padding"):
        ints.to_raw(np.array([0]))


def test_action_ids() -> None:
    values = np.array([1, 2, 3, 4, 5], dtype=np.float32)
    assert action_ids(np.array([1, 5, 3.4, 3.6, np.nan, 9]), values).tolist() == [1, 5, 3, 4, 0, 5]
    log = make_log([1] * 40, list(range(40)), list(range(40)), rating=[i / 4 for i in range(40)])
    data = build_sequences(log)
    assert data.num_actions == 11 and len(data.action_values) == 10  # 40 distinct ratings -> 10 quantiles
    np.testing.assert_array_equal(data.actions, data.action_ids(np.arange(40) / 4))
    assert data.actions.min() == 1 and data.actions.max() == 10 and np.all(np.diff(data.actions) >= 0)
    unrated = build_sequences(
        make_log([1] * 3, [1, 2, 3], [1, 2, 3]), PreprocessConfig(min_user_interactions=3)
    )
    assert unrated.num_actions == 1 and unrated.actions.tolist() == [0, 0, 0]


def test_item_side_features_align_with_the_vocabulary() -> None:
    features = pd.DataFrame(
        {"title": ["B", "A"], "year": [1999, 0], "genres": [("Drama", "War"), ("Comedy",)]},
        index=pd.Index(["b", "a"]),
    )
    log = make_log(["u"] * 3, ["a", "b", "c"], [1, 2, 3], item_features=features)  # "c" has no features
    data = build_sequences(log, PreprocessConfig(min_user_interactions=3))
    assert data.genre_names == ("Comedy", "Drama", "War")
    assert data.item_titles.tolist() == ["", "A", "B", ""]
    assert data.item_years.tolist() == [0, 0, 1, 0] and data.year_values.tolist() == [1999]
    np.testing.assert_array_equal(data.item_genres, [[0, 0, 0], [1, 0, 0], [0, 1, 1], [0, 0, 0]])


def small_data() -> SequenceData:
    """Users with 3, 7 and 4 events; raw item id = 10 * user + position."""
    lengths = [3, 7, 4]
    user = [u for u, n in enumerate(lengths) for _ in range(n)]
    item = [10 * u + k for u, n in enumerate(lengths) for k in range(n)]
    return build_sequences(
        make_log(user, item, list(range(len(user)))), PreprocessConfig(min_user_interactions=3)
    )


def test_tied_share_counts_equal_timestamps_within_a_user_only() -> None:
    assert small_data().tied_share() == 0.0  # every event at its own time
    # user 0 at times 5, 5, 6; user 1 at 6, 6, 6, 7: 3 of the 5 within-user pairs tie (6 -> 6 across users does not)
    tied = build_sequences(make_log([0, 0, 0, 1, 1, 1, 1], list(range(7)), [5, 5, 6, 6, 6, 6, 7]),
                           PreprocessConfig(min_user_interactions=3))
    assert tied.tied_share() == pytest.approx(3 / 5)


def test_leave_one_out_targets_and_histories() -> None:
    data = small_data()
    split = leave_one_out(data)
    to_raw = data.item_vocab.to_raw
    assert to_raw(split.test.target_items).tolist() == [2, 16, 23]
    assert to_raw(split.valid.target_items).tolist() == [1, 15, 22]
    assert split.train.lengths().tolist() == [1, 5, 2] and split.valid.histories.lengths().tolist() == [
        1,
        5,
        2,
    ]
    assert to_raw(
        split.test.histories.items[split.test.histories.offsets[1] : split.test.histories.offsets[2]]
    ).tolist() == [
        10,
        11,
        12,
        13,
        14,
        15,
    ]
    np.testing.assert_array_equal(split.test.target_timestamps, [2, 9, 13])


def test_batches_pad_to_the_batch_max_and_keep_the_most_recent_events() -> None:
    data = small_data()
    histories = data.histories()
    batch = histories.batch(np.array([0, 2]))
    assert batch.items.shape == (2, 4) and batch.lengths.tolist() == [3, 4]  # not 7, the longest user
    assert batch.items[0, 3].item() == 0  # right padding
    cut = histories.batch(np.array([1, 0]), max_len=2)
    assert cut.items.shape == (2, 2) and cut.lengths.tolist() == [2, 2]
    assert data.item_vocab.to_raw(cut.items[0].numpy()).tolist() == [15, 16]
    assert cut.timestamps[1].tolist() == [1, 2]


def test_to_batches_cover_every_user_once() -> None:
    data = small_data()
    split = leave_one_out(data)
    batches = list(split.train.to_batches(batch_size=2, shuffle=True, seed=1, max_len=3))
    assert [b.batch_size for b in batches] == [2, 1] and max(b.max_len for b in batches) <= 3
    again = list(split.train.to_batches(batch_size=2, shuffle=True, seed=1, max_len=3))
    assert all(a.items.equal(b.items) for a, b in zip(batches, again, strict=True))
    assert sorted(int(n) for b in batches for n in b.lengths) == [1, 2, 3]  # lengths 1, 5->3 (cut), 2

    evals = list(split.test.to_batches(batch_size=2))
    assert [e.rows.tolist() for e in evals] == [[0, 1], [2]]
    assert evals[1].target_items.tolist() == split.test.target_items[2:].tolist()
    assert evals[0].history.lengths.tolist() == [2, 6]


def test_windows_make_every_event_after_the_first_a_target_once() -> None:
    data = small_data()  # raw items 0-2, 10-16, 20-23
    histories = data.histories()
    windows = histories.slice(*histories.windows(3))
    rows = [data.item_vocab.to_raw(row).tolist() for row in np.split(windows.items, windows.offsets[1:-1])]
    assert rows == [[0, 1, 2], [14, 15, 16], [12, 13, 14], [10, 11, 12], [21, 22, 23], [20, 21]]
    assert windows.users.tolist() == [data.users[u] for u in (0, 1, 1, 1, 2, 2)]
    assert histories.slice(*histories.windows(7)).lengths().tolist() == [3, 7, 4]  # short enough: as they are
    cut = histories.cut(*histories.windows(3))  # each window with the items of the user's events before it
    assert cut.earlier is not None
    earlier = [data.item_vocab.to_raw(row[row > 0].numpy()).tolist() for row in cut.earlier]
    assert earlier == [[], [10, 11, 12, 13], [10, 11], [], [20], []]
    assert histories.cut(*histories.windows(7)).earlier is None


def test_training_batches_cover_the_whole_log(ml100k: SequenceData) -> None:
    """Histories longer than the model's length are not cut to their most recent events: every training event
    after a user's first is predicted, once an epoch."""
    train = leave_one_out(ml100k).train
    config = TrainConfig(preset="tiny", batch_size=64)  # length 50: most MovieLens users are longer
    batches = train_set_batches(train, config, epoch=3)
    assert max(b.max_len for b in batches) <= PRESETS["tiny"]["max_len"]
    targets = sum(int((b.lengths - 1).sum()) for b in batches)
    assert targets == int((train.lengths() - 1).sum())
    counted = np.bincount(np.concatenate([b.items[:, 1:][b.valid_mask()[:, 1:]].numpy() for b in batches]),
                          minlength=len(ml100k.item_vocab))
    after_first = np.ones(len(train.items), dtype=bool)
    after_first[train.offsets[:-1]] = False
    expected = np.bincount(train.items[after_first], minlength=len(ml100k.item_vocab))
    np.testing.assert_array_equal(counted, expected)


def test_length_groups_partition_the_batch_and_bound_the_attention() -> None:
    lengths = [3, 200, 7, 50, 199, 1, 120, 8]
    batch = SequenceBatch.from_lists([list(range(1, n + 1)) for n in lengths], [list(range(n)) for n in lengths])
    max_pairs = 2 * 200**2
    groups = batch.length_groups(max_pairs=max_pairs)
    rows = torch.cat(groups)
    assert sorted(rows.tolist()) == list(range(len(lengths)))  # every row once
    assert [lengths[i] for i in rows.tolist()] == sorted(lengths)  # shortest first
    for group in groups:
        part = batch.select(group)
        assert part.max_len == max(lengths[i] for i in group.tolist())  # padded to its own longest only
        assert len(group) == 1 or len(group) * part.max_len**2 <= max_pairs
        for j, i in enumerate(group.tolist()):
            assert torch.equal(part.items[j, : lengths[i]], batch.items[i, : lengths[i]])
    assert len(batch.length_groups(max_pairs=1)) == len(lengths)  # one row each, never an empty group
