"""What one request may ask of a served model, and the error a caller gets for asking too much.

Light on purpose (numpy only): the command line reads the defaults without importing the models.
"""

from __future__ import annotations

from dataclasses import dataclass

from genrec.client import protocol

_FIELDS = ("max_history_events", "max_candidates", "max_k")
# The user cache's default budget (torch runtime): a laptop's share, ~40 users of 1,000 events at the
# reference size (README, "Sizing the user cache").
DEFAULT_USER_CACHE_MB = 256.0


class RequestError(ValueError):
    """A bad request: reported to its caller as INVALID_ARGUMENT, never fatal to the batch or the server."""


class Cancelled(Exception):
    """The caller went away (cancelled, or its deadline passed) before its request was computed: CANCELLED."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a served model, set at build time; over a limit is INVALID_ARGUMENT
    before any compute. Defaults bound a request's payload (~2.4 MB of history) and its scoring time."""

    max_history_events: int = 100_000  # events accepted per request, before truncation to the model's max_len
    max_candidates: int = 2_000  # candidates per `rank` request (and per candidate_scorer request)
    max_k: int = 100  # the largest k of recommend / retrieve: the repository's retrieve_k

    def __post_init__(self) -> None:
        for name in _FIELDS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def as_parameters(self) -> dict[str, str]:
        """As the served models' config parameters."""
        return {name: str(getattr(self, name)) for name in _FIELDS}

    @staticmethod
    def from_parameters(parameters: dict[str, str]) -> Limits:
        return Limits(**{name: int(parameters[name]) for name in _FIELDS if name in parameters})

    def check_history(self, events: int) -> None:
        if events > self.max_history_events:
            raise RequestError(f"'{protocol.HISTORY_ITEM_IDS}' has {events} events, more than this server's "
                               f"limit of {self.max_history_events} per request (send the most recent ones)")

    def check_candidates(self, count: int) -> None:
        if count > self.max_candidates:
            raise RequestError(f"'{protocol.CANDIDATE_ITEM_IDS}' has {count} candidates, more than this server's "
                               f"limit of {self.max_candidates} per request (split them across requests)")

    def check_k(self, k: int) -> None:
        if not 1 <= k <= self.max_k:
            raise RequestError(f"'{protocol.K}' must be in 1..{self.max_k} (this repository's --retrieve-k), got {k}")
