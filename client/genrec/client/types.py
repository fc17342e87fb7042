"""Results of the served API: what `recommend`, `retrieve` and `rank` return."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ScoredItem:
    item_id: int  # the raw item id, as in the user's data
    score: float


@dataclass(frozen=True)
class Recommendations:
    """The top-k items of `recommend` or `retrieve`, best first.

    ``num_unknown``: history ids the model has never seen (the server ignored them).
    ``num_truncated``: oldest history events dropped beyond the model's maximum length.
    ``cached_events`` (`recommend`, `rank`): history events whose K/V the server had cached for this ``user_id``;
    0 when it computed the whole history.
    """

    items: tuple[ScoredItem, ...]
    num_unknown: int = 0
    num_truncated: int = 0
    cached_events: int = 0

    @property
    def item_ids(self) -> np.ndarray:  # int64 (k,)
        return np.array([item.item_id for item in self.items], dtype=np.int64)

    @property
    def scores(self) -> np.ndarray:  # float32 (k,)
        return np.array([item.score for item in self.items], dtype=np.float32)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[ScoredItem]:
        return iter(self.items)

    def __getitem__(self, index: int) -> ScoredItem:
        return self.items[index]


@dataclass(frozen=True, eq=False)  # numpy fields: no elementwise __eq__
class Ranking:
    """The scores of `rank`, in the caller's candidate order (read-only arrays).

    ``ordered()`` gives the candidates best first. ``num_unknown`` / ``num_truncated`` / ``cached_events``
    describe the history as in `Recommendations`.
    """

    candidate_ids: np.ndarray  # int64 (C,)
    scores: np.ndarray  # float32 (C,), scores[i] belongs to candidate_ids[i]
    num_unknown: int = 0
    num_truncated: int = 0
    cached_events: int = 0

    def __post_init__(self) -> None:
        if self.candidate_ids.shape != self.scores.shape or self.scores.ndim != 1:
            raise ValueError(
                f"candidate_ids {self.candidate_ids.shape} and scores {self.scores.shape} must be equal 1-D shapes"
            )
        self.candidate_ids.setflags(write=False)
        self.scores.setflags(write=False)

    def ordered(self) -> tuple[ScoredItem, ...]:
        """The candidates sorted by score, best first; ties keep candidate order, NaN scores go last."""
        order = np.argsort(-self.scores, kind="stable")
        return tuple(ScoredItem(int(self.candidate_ids[i]), float(self.scores[i])) for i in order)

    def __len__(self) -> int:
        return int(self.scores.shape[0])
