"""Raw ids and ratings -> the model's dense ids and action ids: one module, light enough for served processes.

Training (`sequences`) and serving (`genrec.builders.handlers`) both map through it, so the two cannot drift
apart; it needs numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _numbers(raw: np.ndarray) -> np.ndarray:
    """Any array -> float64 of the same shape, NaN where an entry is not a number (e.g. "42" -> 42.0)."""
    try:
        return np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        def number(x: object) -> float:
            try:
                return float(x)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                return float("nan")
        return np.array([number(x) for x in raw.ravel()], dtype=np.float64).reshape(raw.shape)


@dataclass(frozen=True)
class Vocabulary:
    """Raw id <-> dense index. Dense index 0 is padding; raw_ids[i] has dense index i + 1."""

    raw_ids: np.ndarray  # (N,) sorted unique raw ids (int64, or object array of str)

    def __len__(self) -> int:
        return len(self.raw_ids)

    @property
    def num_embeddings(self) -> int:
        """N + 1: the embedding table's rows, padding included."""
        return len(self) + 1

    @property
    def is_str(self) -> bool:
        return self.raw_ids.dtype == object

    def to_dense(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(M,) raw ids -> ((M,) int64 dense ids, 0 where unknown; (M,) bool known)."""
        raw = np.asarray(raw)
        if self.is_str:
            query, usable = raw.astype(str).astype(object), np.ones(raw.shape, dtype=bool)
        elif raw.dtype.kind in "iu":
            query, usable = raw.astype(np.int64), np.ones(raw.shape, dtype=bool)
        else:  # e.g. "42" sent for an integer vocabulary
            numbers = _numbers(raw)
            usable = np.isfinite(numbers) & (numbers % 1 == 0)
            query = np.where(usable, numbers, 0).astype(np.int64)
        if len(self) == 0:
            return np.zeros(raw.shape, dtype=np.int64), np.zeros(raw.shape, dtype=bool)
        position = np.minimum(np.searchsorted(self.raw_ids, query), len(self) - 1)  # (M,)
        known = usable & (self.raw_ids[position] == query)
        return np.where(known, position + 1, 0).astype(np.int64), known

    def to_raw(self, dense: np.ndarray) -> np.ndarray:
        """(M,) dense ids in 1..N -> (M,) raw ids."""
        dense = np.asarray(dense, dtype=np.int64)
        if dense.size and (dense.min() < 1 or dense.max() > len(self)):
            raise ValueError(
                f"dense ids must be in 1..{len(self)} (0 is padding), got {dense.min()}..{dense.max()}"
            )
        return self.raw_ids[dense - 1]


def action_ids(ratings: np.ndarray, action_values: np.ndarray) -> np.ndarray:
    """(M,) raw ratings -> (M,) int64 action ids: the nearest of action_values (A,), as 1..A; NaN -> 0.

    The same function maps ratings in training and at serving, so the two cannot drift apart.
    """
    r = np.asarray(ratings, dtype=np.float64)
    if len(action_values) == 0:
        return np.zeros(r.shape, dtype=np.int64)
    values = np.asarray(action_values, dtype=np.float64)
    hi = np.clip(np.searchsorted(values, r), 0, len(values) - 1)
    lo = np.maximum(hi - 1, 0)
    nearest = np.where(np.abs(r - values[lo]) <= np.abs(values[hi] - r), lo, hi)
    return np.where(np.isfinite(r), nearest + 1, 0).astype(np.int64)
