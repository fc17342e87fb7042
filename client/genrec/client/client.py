"""RecommendClient: the blocking gRPC client of the served `recommend`, `rank` and `retrieve` ensembles."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from . import protocol, wire
from .core import ClientCore
from .errors import GenrecError
from .types import Ranking, Recommendations

R = TypeVar("R")


class RecommendClient(ClientCore[Recommendations, Ranking, list[Recommendations], list[Ranking]]):
    """Blocking client over `tritonclient.grpc.InferenceServerClient`; its methods are thread-safe.

    The endpoints, their arguments and the routing, retry and error rules are `ClientCore`'s.
    """

    triton_client = grpcclient.InferenceServerClient

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

    def _request(self, build: Callable[..., wire.Call[R]], *args: Any) -> R:
        return self._send(build(*args))

    def _requests(self, build: Callable[..., list[wire.Call[R]]], *args: Any) -> list[R]:
        return self._send_all(build(*args))

    def _send(self, call: wire.Call[R]) -> R:
        for replica, wait in (attempts := self._attempts(call)):
            if wait:  # sleep(0) still gives up the core: ~0.1 ms a request on a busy 2-core machine
                time.sleep(wait)
            with attempts.failure(replica):
                return call.parse(self._replicas[replica].infer(call.model, call.inputs, **self._options(call)))
        raise attempts.exhausted()

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
