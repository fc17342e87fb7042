"""Interaction log -> per-user time-ordered sequences of dense ids -> leave-one-out splits -> batches.

Everything is jagged (values + offsets, one row per user) until a batch is cut, and a batch is padded
only to its own longest history (`SequenceBatch`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from genrec.training.batch import SequenceBatch, right_padded
from genrec.training.datasets import Interactions
from genrec.training.vocabulary import Vocabulary, action_ids


@dataclass(frozen=True)
class Histories:
    """Per-user event histories, jagged: user u's events are values[offsets[u]:offsets[u + 1]]."""

    users: np.ndarray  # (U,) raw user ids
    offsets: np.ndarray  # (U+1,) int64
    items: np.ndarray  # (E,) int64 dense item ids (>= 1)
    timestamps: np.ndarray  # (E,) int64 unix seconds
    actions: np.ndarray  # (E,) int64 action ids (0 unknown)

    def __len__(self) -> int:
        return len(self.users)

    def lengths(self) -> np.ndarray:
        """(U,) int64."""
        return np.diff(self.offsets)

    def slice(self, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> Histories:
        """Events [starts[i], ends[i]) of user rows[i] (absolute positions in the values), re-packed."""
        lengths = ends - starts  # (R,)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (R+1,)
        index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])  # (E',)
        return Histories(
            self.users[rows], offsets, self.items[index], self.timestamps[index], self.actions[index]
        )

    def batch(self, rows: np.ndarray, max_len: int | None = None) -> SequenceBatch:
        """The histories of `rows`, each cut to its most recent `max_len` events."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        if max_len is not None:
            starts = np.maximum(starts, ends - max_len)
        return self.cut(rows, starts, ends)

    def cut(self, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> SequenceBatch:
        """Events [starts[i], ends[i]) of user rows[i] (absolute positions) as a batch, the items of the user's
        events before them as its `earlier`."""
        part = self.slice(rows, starts, ends)
        batch = SequenceBatch.from_jagged(part.items, part.timestamps, part.actions, part.offsets)
        before = starts - self.offsets[rows]
        if before.any():
            batch.earlier = right_padded(self.slice(rows, self.offsets[rows], starts).items,
                                         np.concatenate([[0], np.cumsum(before)]))
        return batch

    def windows(self, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each history as windows of at most `length` events, counted back from its most recent, each
        overlapping the next older one by one event: every event after a user's first is the target of exactly
        one position. Training on these sees the whole log, where cutting a history to its most recent `length`
        leaves the older events out: a third of an ML-1M log's at 200. Returns each window's row (the user
        repeated), start and end (absolute positions), for `slice` or `cut`."""
        stride = max(length - 1, 1)
        count = np.maximum(-(-(self.lengths() - 1) // stride), 1)  # ceil((n - 1) / stride), at least one row
        rows = np.repeat(np.arange(len(self)), count)
        back = np.arange(len(rows)) - np.repeat(np.cumsum(count) - count, count)  # 0: the most recent window
        ends = self.offsets[rows + 1] - back * stride
        return rows, np.maximum(self.offsets[rows], ends - length), ends

    def to_batches(
        self, batch_size: int, shuffle: bool = False, seed: int = 0, max_len: int | None = None
    ) -> Iterator[SequenceBatch]:
        """All users in batches of `batch_size` (the last may be smaller); pass the epoch as `seed`."""
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for start in range(0, len(order), batch_size):
            yield self.batch(order[start : start + batch_size], max_len)


@dataclass(frozen=True)
class EvalBatch:
    """Histories of B users and the one next event of each that the model must rank first."""

    # cut to the model's most recent `max_len` events; the protocols leave out all its `seen_items`, as
    # `recommend` leaves out the whole history it is sent
    history: SequenceBatch
    rows: np.ndarray  # (B,) int64 row of each user in its Split
    target_items: Tensor  # (B,) int64 dense ids
    target_timestamps: Tensor  # (B,) int64
    target_actions: Tensor  # (B,) int64


@dataclass(frozen=True)
class Split:
    """Histories + one held-out next event per user.

    valid: history = all but the last 2 events, target = the 2nd-to-last;
    test: history = all but the last, target = the last.
    """

    histories: Histories
    target_items: np.ndarray  # (U,) int64 dense ids
    target_timestamps: np.ndarray  # (U,) int64
    target_actions: np.ndarray  # (U,) int64

    def __len__(self) -> int:
        return len(self.histories)

    def to_batches(self, batch_size: int, max_len: int | None = None) -> Iterator[EvalBatch]:
        """Users in order, histories cut to their most recent `max_len` events."""
        for start in range(0, len(self), batch_size):
            rows = np.arange(start, min(start + batch_size, len(self)))
            yield EvalBatch(
                self.histories.batch(rows, max_len),
                rows,
                torch.from_numpy(self.target_items[rows]),
                torch.from_numpy(self.target_timestamps[rows]),
                torch.from_numpy(self.target_actions[rows]),
            )


@dataclass(frozen=True)
class LeaveOneOut:
    """The standard protocol: train on all but the last 2 events (every position predicts the next),
    validate on the 2nd-to-last, test on the last."""

    train: Histories
    valid: Split
    test: Split


@dataclass(frozen=True)
class SequenceData:
    """Per-user time-ordered sequences, jagged (values + offsets), with the item-side features."""

    users: np.ndarray  # (U,) raw user ids, sorted
    offsets: np.ndarray  # (U+1,) int64
    items: np.ndarray  # (E,) int64 dense item ids (>= 1)
    timestamps: np.ndarray  # (E,) int64 unix seconds
    actions: np.ndarray  # (E,) int64 action ids: 0 unknown, 1..A = nearest of action_values
    item_vocab: Vocabulary
    num_actions: int  # A + 1, counting 0 = unknown
    action_values: np.ndarray  # (A,) float32 sorted rating value of each action id 1..A
    item_genres: np.ndarray  # (N+1, G) float32 multi-hot genres per dense item, row 0 zeros; G may be 0
    item_years: np.ndarray  # (N+1,) int64 year id per dense item, 0 unknown
    year_values: np.ndarray  # (Y,) int64 sorted year of each year id 1..Y
    genre_names: tuple[str, ...]  # (G,)
    item_titles: np.ndarray  # (N+1,) object str, '' when unknown
    timed: bool = True  # False: the log had no time (timestamps all 0, events in log order)

    def lengths(self) -> np.ndarray:
        """(U,) int64."""
        return np.diff(self.offsets)

    def sequence(self, u: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Items, timestamps, actions of user row u, oldest first."""
        lo, hi = int(self.offsets[u]), int(self.offsets[u + 1])
        return self.items[lo:hi], self.timestamps[lo:hi], self.actions[lo:hi]

    def action_ids(self, ratings: np.ndarray) -> np.ndarray:
        """(M,) raw ratings -> (M,) int64 action ids, exactly as in training."""
        return action_ids(ratings, self.action_values)

    def tied_share(self) -> float:
        """The share of a user's consecutive events that share their timestamp (0 for a log without time)."""
        if not self.timed:
            return 0.0
        same_user = np.ones(max(len(self.items) - 1, 0), dtype=bool)
        same_user[self.offsets[1:-1] - 1] = False  # a user's last event and the next user's first
        pairs = int(same_user.sum())
        return float((np.diff(self.timestamps) == 0)[same_user].sum() / pairs) if pairs else 0.0

    def histories(self) -> Histories:
        """The full sequences as Histories (for serving or recommending after the test event)."""
        return Histories(self.users, self.offsets, self.items, self.timestamps, self.actions)


@dataclass(frozen=True)
class PreprocessConfig:
    """Which users and items to keep and how finely to keep ratings.

    Items with fewer than `min_item_interactions` events are dropped first (one pass, not an iterated
    k-core), then users with fewer than `min_user_interactions` (>= 3, so leave-one-out keeps a history).
    More distinct ratings than `max_actions` are bucketed into that many quantiles.
    """

    min_user_interactions: int = 5
    min_item_interactions: int = 0
    max_actions: int = 10

    def __post_init__(self) -> None:
        if self.min_user_interactions < 3:
            raise ValueError(
                f"min_user_interactions must be >= 3 for leave-one-out, got {self.min_user_interactions}"
            )
        if self.max_actions < 1:
            raise ValueError(f"max_actions must be >= 1, got {self.max_actions}")


def _counts(values: np.ndarray) -> np.ndarray:
    """(M,) how often each entry's value occurs in `values`."""
    codes, _ = pd.factorize(values)
    return np.bincount(codes)[codes]


def _user_time_order(user_codes: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """(M,) stable order by user, then time; equal timestamps keep their order in the log."""
    low = int(timestamps.min())
    if int(timestamps.max()) - low < 2**32:  # one sort of a packed (user, time) key: 2x faster than two sorts
        return np.argsort((user_codes.astype(np.int64) << 32) | (timestamps - low), kind="stable")
    order = np.argsort(timestamps, kind="stable")
    return order[np.argsort(user_codes[order], kind="stable")]


def _action_values(ratings: np.ndarray, max_actions: int) -> np.ndarray:
    """(A,) float32: the distinct ratings, or `max_actions` quantiles of them when there are more."""
    finite = ratings[np.isfinite(ratings)]
    distinct = np.unique(finite)
    if len(distinct) <= max_actions:
        return distinct.astype(np.float32)
    levels = (np.arange(max_actions) + 0.5) / max_actions
    return np.unique(np.quantile(finite, levels, method="inverted_cdf")).astype(np.float32)


def _item_side(
    features: pd.DataFrame | None, vocab: Vocabulary
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """Titles (N+1,), year ids (N+1,), year values (Y,), multi-hot genres (N+1, G) and genre names."""
    n = len(vocab)
    titles = np.full(n + 1, "", dtype=object)
    if features is None:
        return titles, np.zeros(n + 1, np.int64), np.zeros(0, np.int64), np.zeros((n + 1, 0), np.float32), ()
    aligned = features.reindex(pd.Index(vocab.raw_ids)).reset_index(drop=True)  # row i = dense id i + 1

    if "title" in aligned:
        titles[1:] = aligned["title"].fillna("").astype(str).to_numpy(dtype=object)

    years = np.zeros(n + 1, dtype=np.int64)
    if "year" in aligned:
        years[1:] = aligned["year"].fillna(0).to_numpy(np.int64)
    year_values = np.unique(years[years > 0])
    item_years = np.where(years > 0, np.searchsorted(year_values, years) + 1, 0).astype(np.int64)

    flat = aligned["genres"].explode().dropna() if "genres" in aligned else pd.Series([], dtype=object)
    names = np.array(sorted(set(flat)), dtype=object)  # (G,)
    genres = np.zeros((n + 1, len(names)), dtype=np.float32)
    genres[flat.index.to_numpy() + 1, np.searchsorted(names, flat.to_numpy(dtype=object))] = 1.0
    return titles, item_years, year_values, genres, tuple(str(g) for g in names)


def build_sequences(log: Interactions, config: PreprocessConfig = PreprocessConfig()) -> SequenceData:
    """Filter rare items and users, give items dense ids, order each user's events by time.

    Equal timestamps keep their order in the log (stable sorts), so a rerun gives the same sequences.
    """
    rows = np.arange(len(log.user))
    if config.min_item_interactions > 0:
        rows = rows[_counts(log.item[rows]) >= config.min_item_interactions]
    rows = rows[_counts(log.user[rows]) >= config.min_user_interactions]
    if len(rows) == 0:
        raise ValueError(f"{log.name}: no user has {config.min_user_interactions} or more interactions")

    user_codes, users = pd.factorize(log.user[rows], sort=True)
    item_codes, item_ids = pd.factorize(log.item[rows], sort=True)
    order = _user_time_order(user_codes, log.timestamp[rows])

    counts = np.bincount(user_codes, minlength=len(users))
    vocab = Vocabulary(np.asarray(item_ids))
    if log.rating is None:
        action_values = np.zeros(0, dtype=np.float32)
        actions = np.zeros(len(rows), dtype=np.int64)
    else:
        ratings = log.rating[rows][order]
        action_values = _action_values(ratings, config.max_actions)
        actions = action_ids(ratings, action_values)
    titles, item_years, year_values, genres, genre_names = _item_side(log.item_features, vocab)
    return SequenceData(
        users=np.asarray(users),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        items=(item_codes[order] + 1).astype(np.int64),
        timestamps=log.timestamp[rows][order].astype(np.int64),
        actions=actions,
        item_vocab=vocab,
        num_actions=len(action_values) + 1,
        action_values=action_values,
        item_genres=genres,
        item_years=item_years,
        year_values=year_values,
        genre_names=genre_names,
        item_titles=titles,
        timed=log.timed,
    )


def leave_one_out(data: SequenceData) -> LeaveOneOut:
    """Split every user's sequence: train = all but the last 2, valid target = 2nd-to-last, test = last."""
    full = data.histories()
    rows = np.arange(len(full))
    starts, ends = data.offsets[:-1], data.offsets[1:]

    def held_out(k: int) -> Split:
        target = ends - k  # (U,) position of each user's target event
        return Split(
            full.slice(rows, starts, target),
            data.items[target],
            data.timestamps[target],
            data.actions[target],
        )

    return LeaveOneOut(train=full.slice(rows, starts, ends - 2), valid=held_out(2), test=held_out(1))
