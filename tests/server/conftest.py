"""One real tritonserver per runtime, shared by every module under tests/server.

``server`` is package-scoped and parametrised over the runtimes, so pytest runs all of the torch
server's tests, stops it, then starts the onnx server for the same tests: two servers in all.
A test that needs one runtime only says so with
``@pytest.mark.parametrize("server", ["torch"], indirect=True)``; it reuses the same server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from server_constants import BUILT_FILES, MAX_QUEUE_DELAY_US, RETRIEVE_K, WINDOW_BLOCK, repository_files

from genrec.builders.build import BuildConfig, build_repository
from genrec.builders.tritonserver import ServerConfig, TritonServer, free_ports
from genrec.client import RecommendClient

RUNTIMES = ["torch", "onnx"]


@pytest.fixture(scope="package", params=RUNTIMES)
def server(
    request: pytest.FixtureRequest, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    repository = tmp_path_factory.mktemp(f"repo_{request.param}")
    build_repository(
        BuildConfig(
            checkpoint=tiny_checkpoint,
            repository=repository,
            runtime=request.param,
            retrieve_k=RETRIEVE_K,
            max_queue_delay_us=MAX_QUEUE_DELAY_US,
            window_block=WINDOW_BLOCK,
        )
    )
    BUILT_FILES[repository] = repository_files(repository)
    grpc, http, metrics = free_ports(3)
    with TritonServer(
        ServerConfig(repository, grpc_port=grpc, http_port=http, metrics_port=metrics)
    ) as running:
        yield running


@pytest.fixture(scope="package")
def client(server: TritonServer) -> Iterator[RecommendClient]:
    with RecommendClient(server.url, timeout_s=60) as c:
        yield c
