"""AsyncRecommendClient: `RecommendClient`'s methods as coroutines, over `tritonclient.grpc.aio`.

Create it inside the running event loop (``async with AsyncRecommendClient(...) as client:``):
its gRPC channel belongs to that loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from . import protocol, wire
from .core import ClientCore
from .errors import GenrecError
from .types import Ranking, Recommendations

R = TypeVar("R")


class AsyncRecommendClient(
    ClientCore[
        Awaitable[Recommendations], Awaitable[Ranking], Awaitable[list[Recommendations]], Awaitable[list[Ranking]]
    ]
):
    """The asyncio twin of `RecommendClient`: same arguments, validation, retries and errors; every endpoint
    returns an awaitable (``await client.recommend(...)``)."""

    triton_client = grpcclient.InferenceServerClient

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

    async def _request(self, build: Callable[..., wire.Call[R]], *args: Any) -> R:
        return await self._send(build(*args))

    async def _requests(self, build: Callable[..., list[wire.Call[R]]], *args: Any) -> list[R]:
        return await self._send_all(build(*args))

    async def _send(self, call: wire.Call[R]) -> R:
        for replica, wait in (attempts := self._attempts(call)):
            if wait:
                await asyncio.sleep(wait)
            with attempts.failure(replica):
                result = await self._replicas[replica].infer(call.model, call.inputs, **self._options(call))
                return call.parse(result)
        raise attempts.exhausted()

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
