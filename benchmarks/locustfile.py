"""Locust load test of the served ``recommend`` ensemble over gRPC, through genrec's own RecommendClient.

    locust -f benchmarks/locustfile.py --headless -u 16 -r 16 -t 30s --host grpc://127.0.0.1:8001

Each simulated user sends one real history after another (closed loop, no think time unless
``GENREC_WAIT_S`` is set) and reports every call as a locust request named ``recommend``: its response
time, and the `GenrecError` when it fails. Point it at any genrec server with ``--host``
(``grpc://host:port`` or ``host:port``).

Histories come from ``GENREC_HISTORIES``, a perf_analyzer ``--input-data`` JSON of ``recommend`` requests
(what ``python -m genrec.benchmarks.serving`` writes under ``benchmarks/results/raw/``), or else from
ML-100K (``GENREC_NUM_USERS`` random users, histories capped at ``GENREC_MAX_LEN`` events).
Other settings: ``GENREC_K`` (items per request, 10), ``GENREC_TIMEOUT_S`` (per request, 30).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent
from locust import User, between, constant, events, task
from locust.env import Environment

# Locust has monkey-patched the standard library (importing it does); gRPC's C core must also yield to
# gevent, or one blocking call would stall every simulated user. Before any channel exists.
grpc_gevent.init_gevent()

from genrec.benchmarks.serving_data import History, ml100k_histories, read_histories  # noqa: E402
from genrec.client import GenrecError, RecommendClient  # noqa: E402

_histories: list[History] = []


def _load_histories() -> list[History]:
    path = os.environ.get("GENREC_HISTORIES")
    if path:
        return read_histories(Path(path))
    return ml100k_histories(
        int(os.environ.get("GENREC_NUM_USERS", "256")), max_len=int(os.environ.get("GENREC_MAX_LEN", "200"))
    )


@events.init.add_listener
def _on_init(environment: Environment, **_kwargs: object) -> None:
    _histories[:] = _load_histories()


def _grpc_address(host: str | None) -> str:
    if not host:
        raise ValueError("pass the server with --host grpc://HOST:PORT")
    return host.split("://", 1)[-1].rstrip("/")


class RecommendUser(User):
    """One caller: a RecommendClient of its own, one request at a time."""

    wait_time = (
        between(0, float(os.environ["GENREC_WAIT_S"])) if os.environ.get("GENREC_WAIT_S") else constant(0)
    )

    def on_start(self) -> None:
        self.k = int(os.environ.get("GENREC_K", "10"))
        self.recommender = RecommendClient(
            _grpc_address(self.host), timeout_s=float(os.environ.get("GENREC_TIMEOUT_S", "30")), retries=0
        )
        self.rng = random.Random()

    def on_stop(self) -> None:
        self.recommender.close()

    @task
    def recommend(self) -> None:
        history = self.rng.choice(_histories)
        start = time.perf_counter()
        exception: Exception | None = None
        length = 0
        try:
            result = self.recommender.recommend(
                history.items,
                k=self.k,
                timestamps=history.timestamps,
                actions=history.ratings,
                exclude_seen=True,
            )
            length = len(result.item_ids)
        except GenrecError as error:
            exception = error
        self.environment.events.request.fire(
            request_type="grpc",
            name="recommend",
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length,
            exception=exception,
            context={},
        )
