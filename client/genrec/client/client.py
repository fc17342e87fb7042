"""RecommendClient: the blocking gRPC client of the served `recommend`, `rank` and `retrieve` ensembles."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import TypeVar

import tritonclient.grpc as grpcclient
from numpy.typing import ArrayLike
from tritonclient.utils import InferenceServerException

from . import protocol, validate, wire
from .errors import GenrecError
from .types import Ranking, Recommendations

R = TypeVar("R")


class RecommendClient:
    """Blocking client over `tritonclient.grpc.InferenceServerClient`; its methods are thread-safe.

    One request carries one user's history (oldest event first); Triton batches users server-side.
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
        self._replicas = wire.connect_all(
            grpcclient.InferenceServerClient,
            self.urls,
            ssl=ssl,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
        )

    # -- one user ------------------------------------------------------------------------------

    def recommend(
        self,
        user_seq: ArrayLike,
        k: int = 10,
        *,
        timestamps: ArrayLike | None = None,
        actions: ArrayLike | None = None,
        exclude_seen: bool = True,
        user_id: int | str | None = None,
    ) -> Recommendations:
        """The k best items for one user's history: retrieval, then re-ranking.

        With ``user_id`` (and real ``timestamps``) the server keeps this user's K/V: next time, when the
        history extends this one, only the new events are computed (``Recommendations.cached_events``).
        """
        return self._send(wire.top_k(protocol.RECOMMEND, user_seq, k, timestamps, actions, exclude_seen, user_id))

    def retrieve(
        self,
        user_seq: ArrayLike,
        k: int = 10,
        *,
        timestamps: ArrayLike | None = None,
        actions: ArrayLike | None = None,
        exclude_seen: bool = True,
    ) -> Recommendations:
        """The k best items by the retrieval score alone (no re-ranking)."""
        return self._send(wire.top_k(protocol.RETRIEVE, user_seq, k, timestamps, actions, exclude_seen))

    def rank(
        self,
        user_seq: ArrayLike,
        candidates: ArrayLike,
        *,
        timestamps: ArrayLike | None = None,
        actions: ArrayLike | None = None,
        user_id: int | str | None = None,
    ) -> Ranking:
        """One score per candidate item, in the order given; `Ranking.ordered()` sorts them. ``user_id`` as
        in `recommend` (the two share the user's cached K/V)."""
        return self._send(wire.rank(user_seq, candidates, timestamps, actions, user_id))

    # -- many users, sent concurrently ---------------------------------------------------------

    def recommend_batch(
        self,
        user_seqs: Sequence[ArrayLike],
        k: int = 10,
        *,
        timestamps: Sequence[ArrayLike | None] | None = None,
        actions: Sequence[ArrayLike | None] | None = None,
        exclude_seen: bool = True,
    ) -> list[Recommendations]:
        """`recommend` for each user; ``timestamps``/``actions`` hold one entry (or None) per user.

        Every user's input is validated before anything is sent; the first failing user raises.
        """
        return self._send_all(
            wire.top_k_batch(protocol.RECOMMEND, user_seqs, k, timestamps, actions, exclude_seen)
        )

    def retrieve_batch(
        self,
        user_seqs: Sequence[ArrayLike],
        k: int = 10,
        *,
        timestamps: Sequence[ArrayLike | None] | None = None,
        actions: Sequence[ArrayLike | None] | None = None,
        exclude_seen: bool = True,
    ) -> list[Recommendations]:
        """`retrieve` for each user, as `recommend_batch`."""
        return self._send_all(
            wire.top_k_batch(protocol.RETRIEVE, user_seqs, k, timestamps, actions, exclude_seen)
        )

    def rank_batch(
        self,
        user_seqs: Sequence[ArrayLike],
        candidates: Sequence[ArrayLike],
        *,
        timestamps: Sequence[ArrayLike | None] | None = None,
        actions: Sequence[ArrayLike | None] | None = None,
    ) -> list[Ranking]:
        """`rank` for each user; ``candidates`` holds one candidate list per user."""
        return self._send_all(wire.rank_batch(user_seqs, candidates, timestamps, actions))

    # -- server state, lifetime ----------------------------------------------------------------

    def ready(self) -> bool:
        """True when every replica is live with the three ensembles ready; False, never an error, otherwise."""
        try:
            return all(
                triton.is_server_live(client_timeout=self.timeout_s)
                and all(triton.is_model_ready(model, client_timeout=self.timeout_s) for model in protocol.ENDPOINTS)
                for triton in self._replicas
            )
        except InferenceServerException:
            return False

    def close(self) -> None:
        for triton in self._replicas:
            triton.close()

    def __enter__(self) -> RecommendClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- sending -------------------------------------------------------------------------------

    def _send(self, call: wire.Call[R]) -> R:
        for replica, wait in wire.attempts(self._router.order(call.user_id), self.retries):
            time.sleep(wait)
            try:
                result = self._replicas[replica].infer(
                    call.model, call.inputs, outputs=call.outputs, client_timeout=self.timeout_s
                )
            except InferenceServerException as exc:
                err = wire.error(exc, call.model, self.urls[replica])
                if not wire.is_transient(err):
                    raise err from None
            else:
                return call.parse(result)
        raise err

    def _send_all(self, calls: list[wire.Call[R]]) -> list[R]:
        """Each user's own request (their lengths differ), all in flight together; results in order."""
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(calls))) as pool:
            futures: list[Future[R]] = [pool.submit(self._send, call) for call in calls]
            results = []
            for i, future in enumerate(futures):
                try:
                    results.append(future.result())
                except GenrecError as err:
                    for pending in futures[i + 1 :]:
                        pending.cancel()
                    raise wire.in_batch(err, i) from None
            return results
