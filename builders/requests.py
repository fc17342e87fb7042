"""One request's tensors, checked, and a user's raw history turned into the model's input (contract 5).

`parse_history` is the one path from what a caller sent to what the model sees: the served models, the
benchmarks' in-process runs and the served = offline tests all call it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from genrec.builders.limits import Limits, RequestError
from genrec.builders.user_cache import RawHistory
from genrec.client import protocol, validate
from genrec.training.checkpoint import CheckpointMeta
from genrec.training.pipeline import window_start
from genrec.training.vocabulary import Vocabulary, action_ids

Request = dict[str, np.ndarray]
Result = dict[str, np.ndarray] | Exception


def tensor(request: Request, name: str) -> np.ndarray:
    """The request's tensor `name`; a RequestError naming it when the request has none."""
    if name not in request:
        raise RequestError(f"missing input '{name}'")
    return np.asarray(request[name])


def row(request: Request, name: str, dtype: type) -> np.ndarray:
    """The request's tensor `name` as a 1-D array (its batch dimension must be 1)."""
    array = tensor(request, name)
    if array.ndim != 2 or array.shape[0] != 1:
        raise RequestError(f"'{name}' must have shape [1, n] (one user per request), got {list(array.shape)}")
    return array[0].astype(dtype, copy=False)


def scalar(request: Request, name: str) -> int:
    values = row(request, name, np.int64)
    if values.shape != (1,):
        raise RequestError(f"'{name}' must hold exactly one value, got {values.shape[0]}")
    return int(values[0])


def require_finite(values: np.ndarray, name: str) -> None:
    if not np.isfinite(values).all():
        raise RequestError(f"'{name}' holds NaN or infinite values")


def examples(values: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")


@dataclass(frozen=True)
class Catalogue:
    """Raw <-> dense ids and the rating -> action mapping of one checkpoint."""

    vocab: Vocabulary
    action_values: np.ndarray  # (A,) rating value of action id a + 1

    @staticmethod
    def from_meta(meta: CheckpointMeta) -> Catalogue:
        if not np.issubdtype(meta.item_raw_ids.dtype, np.integer):
            raise ValueError("the served API speaks integer item ids; this checkpoint's ids are strings")
        return Catalogue(Vocabulary(meta.item_raw_ids), meta.action_values)

    def actions(self, ratings: np.ndarray) -> np.ndarray:
        """Raw ratings (0 = unknown) -> action ids, exactly as in training."""
        if len(self.action_values) == 0:
            return np.zeros(len(ratings), np.int64)
        return np.where(ratings == 0, 0, action_ids(ratings.astype(np.float64), self.action_values))

    def known_candidates(self, raw: np.ndarray, field: str) -> np.ndarray:
        dense, known = self.vocab.to_dense(raw)
        if not known.all():
            raise RequestError(f"{field} holds ids the model has never seen: {examples(raw[~known])}")
        return dense


@dataclass(frozen=True)
class History:
    """The served window of one user's history, and what it came from."""

    items: np.ndarray  # (L,) dense
    timestamps: np.ndarray  # (L,)
    actions: np.ndarray  # (L,) action ids
    num_unknown: int
    num_truncated: int  # = the window's start among the known events
    raw: RawHistory  # as sent
    seen: np.ndarray  # (N,) dense ids of the whole history, 0 where unknown

    def events(self, start: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The window's events from `start` on: items, timestamps, actions."""
        return self.items[start:], self.timestamps[start:], self.actions[start:]


DEFAULT_LIMITS = Limits()


def parse_history(
    request: Request, catalogue: Catalogue, max_len: int, limits: Limits = DEFAULT_LIMITS, block: int = 1
) -> History:
    """Validate one user's history (contract 5). Unknown ids are dropped and counted; a history longer
    than the model's maximum loses its oldest events in blocks of `block` (`window_start`), counted."""
    items = row(request, protocol.HISTORY_ITEM_IDS, np.int64)
    timestamps = row(request, protocol.HISTORY_TIMESTAMPS, np.int64)
    ratings = row(request, protocol.HISTORY_ACTIONS, np.int64)
    if len(items) == 0:
        raise RequestError(f"'{protocol.HISTORY_ITEM_IDS}' is empty: a user needs at least one event")
    limits.check_history(len(items))
    for name, values in ((protocol.HISTORY_TIMESTAMPS, timestamps), (protocol.HISTORY_ACTIONS, ratings)):
        if len(values) != len(items):
            raise RequestError(f"'{name}' has {len(values)} values but '{protocol.HISTORY_ITEM_IDS}' has {len(items)}")
    problem = validate.history_problem(timestamps, ratings, (protocol.HISTORY_TIMESTAMPS, protocol.HISTORY_ACTIONS))
    if problem is not None:
        raise RequestError(problem)
    dense, known = catalogue.vocab.to_dense(items)
    if not known.any():
        raise RequestError(f"none of the {len(items)} history item ids is known to the model: {examples(items)}")
    known_at = np.flatnonzero(known)
    start = window_start(len(known_at), max_len, block)
    keep = known_at[start:]
    return History(
        items=dense[keep],
        timestamps=timestamps[keep],
        actions=catalogue.actions(ratings[keep]),
        num_unknown=int((~known).sum()),
        num_truncated=start,
        raw=RawHistory(items, timestamps, ratings),
        seen=dense,
    )
