"""AsyncRecommendClient: `RecommendClient`'s methods as coroutines, over `tritonclient.grpc.aio`.

Create it inside the running event loop (``async with AsyncRecommendClient(...) as client:``):
its gRPC channel belongs to that loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType
from typing import TypeVar

import tritonclient.grpc.aio as grpcclient
from numpy.typing import ArrayLike
from tritonclient.utils import InferenceServerException

from . import protocol, validate, wire
from .errors import GenrecError
from .types import Ranking, Recommendations

R = TypeVar("R")


class AsyncRecommendClient:
    """The asyncio twin of `RecommendClient`: same arguments, validation, retries and errors."""

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

    async def recommend(
        self,
        user_seq: ArrayLike,
        k: int = 10,
        *,
        timestamps: ArrayLike | None = None,
        actions: ArrayLike | None = None,
        exclude_seen: bool = True,
        user_id: int | str | None = None,
    ) -> Recommendations:
        """See `RecommendClient.recommend`."""
        return await self._send(
            wire.top_k(protocol.RECOMMEND, user_seq, k, timestamps, actions, exclude_seen, user_id)
        )

    async def retrieve(
        self,
        user_seq: ArrayLike,
        k: int = 10,
        *,
        timestamps: ArrayLike | None = None,
        actions: ArrayLike | None = None,
        exclude_seen: bool = True,
    ) -> Recommendations:
        return await self._send(wire.top_k(protocol.RETRIEVE, user_seq, k, timestamps, actions, exclude_seen))

    async def rank(
        self,
        user_seq: ArrayLike,
        candidates: ArrayLike,
        *,
        timestamps: ArrayLike | None = None,
        actions: ArrayLike | None = None,
        user_id: int | str | None = None,
    ) -> Ranking:
        return await self._send(wire.rank(user_seq, candidates, timestamps, actions, user_id))

    async def recommend_batch(
        self,
        user_seqs: Sequence[ArrayLike],
        k: int = 10,
        *,
        timestamps: Sequence[ArrayLike | None] | None = None,
        actions: Sequence[ArrayLike | None] | None = None,
        exclude_seen: bool = True,
    ) -> list[Recommendations]:
        return await self._send_all(
            wire.top_k_batch(protocol.RECOMMEND, user_seqs, k, timestamps, actions, exclude_seen)
        )

    async def retrieve_batch(
        self,
        user_seqs: Sequence[ArrayLike],
        k: int = 10,
        *,
        timestamps: Sequence[ArrayLike | None] | None = None,
        actions: Sequence[ArrayLike | None] | None = None,
        exclude_seen: bool = True,
    ) -> list[Recommendations]:
        return await self._send_all(
            wire.top_k_batch(protocol.RETRIEVE, user_seqs, k, timestamps, actions, exclude_seen)
        )

    async def rank_batch(
        self,
        user_seqs: Sequence[ArrayLike],
        candidates: Sequence[ArrayLike],
        *,
        timestamps: Sequence[ArrayLike | None] | None = None,
        actions: Sequence[ArrayLike | None] | None = None,
    ) -> list[Ranking]:
        return await self._send_all(wire.rank_batch(user_seqs, candidates, timestamps, actions))

    async def ready(self) -> bool:
        """True when every replica is live with the three ensembles ready; False, never an error, otherwise."""
        try:
            for triton in self._replicas:
                if not await triton.is_server_live(client_timeout=self.timeout_s):
                    return False
                for model in protocol.ENDPOINTS:
                    if not await triton.is_model_ready(model, client_timeout=self.timeout_s):
                        return False
            return True
        except InferenceServerException:
            return False

    async def close(self) -> None:
        for triton in self._replicas:
            await triton.close()

    async def __aenter__(self) -> AsyncRecommendClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _send(self, call: wire.Call[R]) -> R:
        """As `RecommendClient._send`: the user's replicas in order, rounds apart by a jittered backoff."""
        for replica, wait in wire.attempts(self._router.order(call.user_id), self.retries):
            await asyncio.sleep(wait)
            try:
                result = await self._replicas[replica].infer(
                    call.model, call.inputs, outputs=call.outputs, client_timeout=self.timeout_s
                )
            except InferenceServerException as exc:
                err = wire.error(exc, call.model, self.urls[replica])
                if not wire.is_transient(err):
                    raise err from None
            else:
                return call.parse(result)
        raise err

    async def _send_all(self, calls: list[wire.Call[R]]) -> list[R]:
        """Each user's own request, at most `concurrency` in flight; results in order, first error raised."""
        slots = asyncio.Semaphore(self.concurrency)

        async def send(call: wire.Call[R]) -> R:
            async with slots:
                return await self._send(call)

        tasks = [asyncio.ensure_future(send(call)) for call in calls]
        try:
            results = []
            for i, task in enumerate(tasks):
                try:
                    results.append(await task)
                except GenrecError as err:
                    raise wire.in_batch(err, i) from None
            return results
        finally:
            for task in tasks:
                task.cancel()
