"""What the blocking and the asyncio clients share: construction, the endpoints' signatures, validation and
request building (`wire`), and parsing. Each subclass supplies only how a call is sent (`_send`, `_send_all`),
so each endpoint's result comes back as it is (`RecommendClient`) or as an awaitable (`AsyncRecommendClient`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from numpy.typing import ArrayLike

from . import protocol, validate, wire

One = TypeVar("One")  # one user's Recommendations, or an awaitable of them
OneRanking = TypeVar("OneRanking")
Many = TypeVar("Many")  # list[Recommendations], or an awaitable of it
ManyRankings = TypeVar("ManyRankings")
UserId = int | str | None  # names the user whose K/V the server keeps (`recommend`)
PerUser = Sequence[ArrayLike | None] | None  # one entry (or None) per user of a batch call, or None for all


class ClientCore(Generic[One, OneRanking, Many, ManyRankings]):
    """One request carries one user's history (oldest event first); Triton batches users server-side.

    ``url`` is one server or a list of replicas: a call naming a ``user_id`` always goes to that user's
    replica (`wire.Router`), where the server keeps the user's K/V, and fails over to the user's next
    replica when it is unavailable; other calls take the replicas in turn.
    ``timeout_s`` bounds each attempt; ``retries`` more rounds over the replicas follow an ``UNAVAILABLE``
    error (unreachable), after up to 0.1 s, 0.2 s, ... with random jitter. A ``DEADLINE_EXCEEDED`` is not
    retried: the server may still be computing it. Every failure raises `GenrecError`.

    ``timestamps`` (unix seconds, non-decreasing) default to ``int(time.time())`` for every event:
    the model's time-gap bias then sees zero gaps, so pass real timestamps when you have them.
    ``actions`` (rating/action codes, >= 0) default to 0, "unknown".
    """

    triton_client: type  # tritonclient.grpc's or tritonclient.grpc.aio's InferenceServerClient

    def __init__(
        self,
        url: str | Sequence[str] = "localhost:8001",
        *,
        timeout_s: float = 10.0,
        retries: int = 2,
        concurrency: int = 16,
        ssl: bool = False,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
    ) -> None:
        validate.settings(timeout_s, retries, concurrency)
        self.urls = validate.urls(url)
        self.url = self.urls[0]
        self.timeout_s = timeout_s
        self.retries = retries
        self.concurrency = concurrency  # most requests in flight in the *_batch methods
        self._router = wire.Router(self.urls)
        self._replicas: list[Any] = wire.connect_all(
            self.triton_client,
            self.urls,
            ssl=ssl,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
        )

    def _attempts(self, call: wire.Call[Any]) -> wire.Attempts:
        """The call's attempts: its user's replicas in order, `retries` more rounds after a jittered backoff."""
        return wire.Attempts(call, self._router.order(call.user_id), self.retries, self.urls)

    def _options(self, call: wire.Call[Any]) -> dict[str, Any]:
        """tritonclient's ``infer`` arguments beside the model and inputs."""
        return {"outputs": call.outputs, "client_timeout": self.timeout_s}

    def _request(self, build: Callable[..., wire.Call[Any]], *args: Any) -> Any:
        """``build(*args)`` (validation, the request) and send it: in the async client, both when awaited."""
        raise NotImplementedError

    def _requests(self, build: Callable[..., list[wire.Call[Any]]], *args: Any) -> Any:
        """`_request` for a batch of users: every user validated before anything is sent."""
        raise NotImplementedError

    # -- one user ------------------------------------------------------------------------------

    def recommend(self, user_seq: ArrayLike, k: int = 10, *, timestamps: ArrayLike | None = None,
                  actions: ArrayLike | None = None, exclude_seen: bool = True, user_id: UserId = None) -> One:
        """The k best items for one user's history: retrieval, then re-ranking.

        With ``user_id`` (and real ``timestamps``) the server keeps this user's K/V: next time, when the
        history extends this one, only the new events are computed (``Recommendations.cached_events``).
        """
        return self._request(wire.top_k, protocol.RECOMMEND, user_seq, k, timestamps, actions, exclude_seen, user_id)

    def retrieve(self, user_seq: ArrayLike, k: int = 10, *, timestamps: ArrayLike | None = None,
                 actions: ArrayLike | None = None, exclude_seen: bool = True) -> One:
        """The k best items by the retrieval score alone (no re-ranking)."""
        return self._request(wire.top_k, protocol.RETRIEVE, user_seq, k, timestamps, actions, exclude_seen)

    def rank(self, user_seq: ArrayLike, candidates: ArrayLike, *, timestamps: ArrayLike | None = None,
             actions: ArrayLike | None = None, user_id: UserId = None) -> OneRanking:
        """One score per candidate item, in the order given; `Ranking.ordered()` sorts them. ``user_id`` as
        in `recommend` (the two share the user's cached K/V)."""
        return self._request(wire.rank, user_seq, candidates, timestamps, actions, user_id)

    # -- many users, sent concurrently ---------------------------------------------------------

    def recommend_batch(self, user_seqs: Sequence[ArrayLike], k: int = 10, *, timestamps: PerUser = None,
                        actions: PerUser = None, exclude_seen: bool = True) -> Many:
        """`recommend` for each user; ``timestamps``/``actions`` hold one entry (or None) per user.

        Every user's input is validated before anything is sent; the first failing user raises.
        """
        return self._requests(wire.top_k_batch, protocol.RECOMMEND, user_seqs, k, timestamps, actions, exclude_seen)

    def retrieve_batch(self, user_seqs: Sequence[ArrayLike], k: int = 10, *, timestamps: PerUser = None,
                       actions: PerUser = None, exclude_seen: bool = True) -> Many:
        """`retrieve` for each user, as `recommend_batch`."""
        return self._requests(wire.top_k_batch, protocol.RETRIEVE, user_seqs, k, timestamps, actions, exclude_seen)

    def rank_batch(self, user_seqs: Sequence[ArrayLike], candidates: Sequence[ArrayLike], *,
                   timestamps: PerUser = None, actions: PerUser = None) -> ManyRankings:
        """`rank` for each user; ``candidates`` holds one candidate list per user."""
        return self._requests(wire.rank_batch, user_seqs, candidates, timestamps, actions)
