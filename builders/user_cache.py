"""The served user cache: per user id, the K/V of the history the server last computed, in a byte budget.

Histories are append-only in the common case: a returning user sends the same events plus a few new ones.
`UserCache.lookup` says whether a request's history *extends* the cached one, comparing the raw events as
sent (ids, timestamps, actions: exactly, not by hash) and the served window's start (see
`genrec.training.pipeline.window_start`); anything else is an invalidation, recomputed from scratch. The
cache lives in one model instance's process, so a new model version starts empty and never serves another
version's K/V.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from genrec.builders.runtimes import UserState

INVALIDATIONS = ("edited", "window", "expired")  # why a cached user was recomputed


@dataclass(frozen=True)
class RawHistory:
    """A history as the caller sent it, before unknown ids are dropped: the cache's fingerprint."""

    items: np.ndarray
    timestamps: np.ndarray
    actions: np.ndarray

    def __len__(self) -> int:
        return len(self.items)

    @property
    def nbytes(self) -> int:
        return self.items.nbytes + self.timestamps.nbytes + self.actions.nbytes

    def starts_with(self, prefix: RawHistory) -> bool:
        n = len(prefix)
        return n <= len(self) and all(
            np.array_equal(mine[:n], theirs)
            for mine, theirs in ((self.items, prefix.items), (self.timestamps, prefix.timestamps),
                                 (self.actions, prefix.actions))
        )


@dataclass
class Entry:
    history: RawHistory
    window_start: int  # index of the first known event in the window
    num_events: int  # events in the window, all of them in `state`
    state: UserState
    used_at: float

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + self.history.nbytes


@dataclass(frozen=True)
class Lookup:
    """What the cache holds for a request: an entry it extends (``entry``), or why not (``reason``:
    "miss" or one of `INVALIDATIONS`)."""

    entry: Entry | None
    reason: str


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    events_appended: int = 0
    evictions: int = 0
    too_large: int = 0  # entries bigger than the whole budget, not kept
    invalidations: Counter[str] = field(default_factory=Counter)


class UserCache:
    """LRU over users within ``budget_bytes`` (K/V as allocated plus the fingerprint); ``ttl_s`` > 0 expires
    an entry that long after its last use."""

    def __init__(self, budget_bytes: int, ttl_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        if budget_bytes <= 0 or ttl_s < 0:
            raise ValueError(f"budget_bytes must be > 0 and ttl_s >= 0, got {budget_bytes}, {ttl_s}")
        self.budget_bytes, self.ttl_s, self.clock = budget_bytes, ttl_s, clock
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.bytes_in_use = 0
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def users(self) -> list[bytes]:
        """Cached users, least recently used first."""
        return list(self._entries)

    def lookup(self, user_id: bytes, history: RawHistory, window_start: int) -> Lookup:
        """The entry `history` extends, counted as a hit; otherwise the entry (if any) is dropped, and the
        miss or the invalidation is counted."""
        entry = self._entries.get(user_id)
        if entry is None:
            self.stats.misses += 1
            return Lookup(None, "miss")
        self._drop(user_id)
        if self.ttl_s and self.clock() - entry.used_at > self.ttl_s:
            reason = "expired"
        elif not history.starts_with(entry.history):
            reason = "edited"
        elif window_start != entry.window_start:
            reason = "window"
        else:
            self.stats.hits += 1
            return Lookup(entry, "hit")
        self.stats.invalidations[reason] += 1
        return Lookup(None, reason)

    def store(self, user_id: bytes, history: RawHistory, window_start: int, num_events: int,
              state: UserState, appended: int) -> None:
        """Keep the user's new state as the most recently used, evicting the least recently used to fit."""
        self.stats.events_appended += appended
        self._drop(user_id)
        # A copy: a served request's arrays are views of the Python backend's shared memory, which a later
        # request reuses; a fingerprint read from there could match a history it never saw.
        kept = RawHistory(*(np.array(a, copy=True) for a in (history.items, history.timestamps, history.actions)))
        entry = Entry(kept, window_start, num_events, state, self.clock())
        if entry.nbytes > self.budget_bytes:
            self.stats.too_large += 1
            return
        while self.bytes_in_use + entry.nbytes > self.budget_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            self.stats.evictions += 1
        self._entries[user_id] = entry
        self.bytes_in_use += entry.nbytes

    def _drop(self, user_id: bytes) -> None:
        entry = self._entries.pop(user_id, None)
        if entry is not None:
            self.bytes_in_use -= entry.nbytes
