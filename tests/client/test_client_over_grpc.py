"""The clients over real gRPC against the in-process stub Triton (see conftest.py).

These prove the wire (what arrives at the server), the status mapping, retries, timeouts and the
concurrent batch methods; a real tritonserver is tested elsewhere.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pytest

from genrec.client import GenrecError, RecommendClient, protocol
from genrec.client.aio import AsyncRecommendClient

if TYPE_CHECKING:
    from conftest import StubTriton


def _closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_recommend_sends_the_protocol(stub: StubTriton, stub_url: str) -> None:
    with RecommendClient(stub_url) as client:
        recs = client.recommend([3, 1, 2], k=4, timestamps=[10, 20, 30], actions=[0, 5, 1])
    assert recs.item_ids.tolist() == [4, 5, 6, 7]  # 1, 2, 3 are in the history and excluded
    assert recs.scores.dtype == np.float32 and (recs.num_unknown, recs.num_truncated) == (0, 0)
    ((model, seen),) = stub.requests
    assert model == protocol.RECOMMEND
    assert {name: (got.datatype, got.shape) for name, got in seen.items()} == {
        protocol.HISTORY_ITEM_IDS: ("INT64", (1, 3)),
        protocol.HISTORY_TIMESTAMPS: ("INT64", (1, 3)),
        protocol.HISTORY_ACTIONS: ("INT64", (1, 3)),
        protocol.K: ("INT32", (1, 1)),
        protocol.EXCLUDE_SEEN: ("BOOL", (1, 1)),
    }
    assert seen[protocol.HISTORY_ITEM_IDS].data.tolist() == [[3, 1, 2]]
    assert seen[protocol.HISTORY_TIMESTAMPS].data.tolist() == [[10, 20, 30]]
    assert seen[protocol.HISTORY_ACTIONS].data.tolist() == [[0, 5, 1]]
    assert seen[protocol.K].data.tolist() == [[4]] and seen[protocol.EXCLUDE_SEEN].data.tolist() == [[True]]


def test_default_timestamps_are_now_and_actions_unknown(stub: StubTriton, stub_url: str) -> None:
    before = int(time.time())
    with RecommendClient(stub_url) as client:
        client.retrieve([1, 2], k=2, exclude_seen=False)
    ((model, seen),) = stub.requests
    timestamps = seen[protocol.HISTORY_TIMESTAMPS].data[0]
    assert model == protocol.RETRIEVE
    assert timestamps[0] == timestamps[1] and before <= timestamps[0] <= int(time.time())
    assert seen[protocol.HISTORY_ACTIONS].data.tolist() == [[0, 0]]
    assert seen[protocol.EXCLUDE_SEEN].data.tolist() == [[False]]


def test_unknown_and_truncated_history_is_reported(stub: StubTriton, stub_url: str) -> None:
    history = [5_000_000, *range(1, stub.MAX_LEN + 3)]  # one unknown id, stub.MAX_LEN + 3 events in all
    with RecommendClient(stub_url) as client:
        recs = client.recommend(history, k=3)
        ranking = client.rank(history, [10, 3, 6])
    assert (recs.num_unknown, recs.num_truncated) == (1, 3)
    assert (ranking.num_unknown, ranking.num_truncated) == (1, 3)
    assert ranking.scores.tolist() == [3.0, 3.0, 6.0]  # the stub scores id % 7, in candidate order
    assert [item.item_id for item in ranking.ordered()] == [6, 10, 3]


def test_server_errors_are_not_retried(stub: StubTriton, stub_url: str) -> None:
    with RecommendClient(stub_url, retries=3) as client, pytest.raises(GenrecError) as info:
        client.retrieve([1, 2], k=stub.DEPTH + 1)
    err = info.value
    assert (err.status, err.model) == ("INVALID_ARGUMENT", protocol.RETRIEVE)
    assert f"k={stub.DEPTH + 1} exceeds the retrieval depth {stub.DEPTH}" in str(err)
    assert len(stub.requests) == 1


def test_transient_errors_are_retried(stub: StubTriton, stub_url: str) -> None:
    stub.failures[:] = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    with RecommendClient(stub_url, retries=2) as client:
        assert len(client.recommend([1], k=2)) == 2
    assert len(stub.requests) == 3
    stub.reset()
    stub.failures[:] = [grpc.StatusCode.UNAVAILABLE] * 2
    with RecommendClient(stub_url, retries=1) as client, pytest.raises(GenrecError) as info:
        client.recommend([1], k=2)
    assert info.value.status == "UNAVAILABLE" and "stub failure UNAVAILABLE" in str(info.value)
    assert len(stub.requests) == 2


def test_timeout_is_deadline_exceeded(stub: StubTriton, stub_url: str) -> None:
    stub.delay_s = 0.3
    with RecommendClient(stub_url, timeout_s=0.05, retries=1) as client, pytest.raises(GenrecError) as info:
        client.rank([1], [2])
    assert info.value.status == "DEADLINE_EXCEEDED" and info.value.model == protocol.RANK
    assert len(stub.requests) == 2  # retried once


def test_unreachable_server() -> None:
    url = _closed_port()
    with RecommendClient(url, timeout_s=2.0, retries=1) as client:
        assert client.ready() is False
        with pytest.raises(GenrecError) as info:
            client.recommend([1, 2])
    assert info.value.status == "UNAVAILABLE" and url in str(info.value)


def test_ready(stub: StubTriton, stub_url: str) -> None:
    with RecommendClient(stub_url) as client:
        assert client.ready() is True
        stub.ready_models.discard(protocol.RANK)
        assert client.ready() is False
        stub.reset()
        stub.live = False
        assert client.ready() is False


def test_batches_are_concurrent_and_in_order(stub: StubTriton, stub_url: str) -> None:
    stub.delay_s = 0.2
    histories = [[i] for i in range(1, 9)]
    with RecommendClient(stub_url, concurrency=8) as client:
        start = time.perf_counter()
        batch = client.recommend_batch(histories, k=2, timestamps=[None] * 7 + [[5]])
        elapsed = time.perf_counter() - start
    assert elapsed < 0.2 * len(histories) / 2  # sequential would take 1.6 s
    assert [recs.item_ids.tolist() for recs in batch] == [[2, 3], [1, 3], *([[1, 2]] * 6)]
    assert sorted(seen[protocol.HISTORY_ITEM_IDS].data[0, 0] for _, seen in stub.requests) == list(
        range(1, 9)
    )


def test_batch_variants(stub: StubTriton, stub_url: str) -> None:
    with RecommendClient(stub_url) as client:
        retrieved = client.retrieve_batch([[1], [1, 2, 3]], k=3, exclude_seen=False)
        ranked = client.rank_batch([[1], [1, 2, 3]], [[7, 8], [9]], actions=[[1], None])
    assert [recs.item_ids.tolist() for recs in retrieved] == [[1, 2, 3], [1, 2, 3]]
    assert [r.scores.tolist() for r in ranked] == [[0.0, 1.0], [2.0]]


def test_batch_error_names_the_user(stub: StubTriton, stub_url: str) -> None:
    with RecommendClient(stub_url, retries=0) as client:
        stub.failures[:] = [grpc.StatusCode.INTERNAL]
        with pytest.raises(GenrecError, match=r"^user_seqs\[0\]: recommend at .*\[INTERNAL\]") as info:
            client.recommend_batch([[1]], k=2)
    assert info.value.status == "INTERNAL"


def test_async_client(stub: StubTriton, stub_url: str) -> None:
    async def run() -> None:
        async with AsyncRecommendClient(stub_url, retries=1) as client:
            assert await client.ready() is True
            recs = await client.recommend([1, 2], k=2)
            assert recs.item_ids.tolist() == [3, 4]
            retrieved = await client.retrieve([1], k=1, exclude_seen=False)
            assert retrieved.item_ids.tolist() == [1] and retrieved.scores.tolist() == [2.0]
            ranking = await client.rank([1], [13, 14])
            assert ranking.scores.tolist() == [6.0, 0.0]
            batch = await client.recommend_batch([[1], [2], [3]], k=1)
            assert [r.item_ids.tolist() for r in batch] == [[2], [1], [1]]
            assert len(await client.retrieve_batch([[1], [2]], k=1)) == 2
            assert len(await client.rank_batch([[1], [2]], [[1], [2, 3]])) == 2
            stub.failures[:] = [grpc.StatusCode.UNAVAILABLE]
            assert len(await client.recommend([1], k=1)) == 1  # retried
            with pytest.raises(GenrecError) as info:
                await client.retrieve([1], k=stub.DEPTH + 1)
            assert info.value.status == "INVALID_ARGUMENT"
            with pytest.raises(GenrecError, match=r"^user_seqs\[1\] is empty"):
                await client.rank_batch([[1], []], [[1], [2]])

    asyncio.run(run())


def test_async_client_unreachable() -> None:
    async def run() -> None:
        async with AsyncRecommendClient(_closed_port(), timeout_s=2.0, retries=0) as client:
            assert await client.ready() is False
            with pytest.raises(GenrecError) as info:
                await client.recommend([1])
            assert info.value.status == "UNAVAILABLE"

    asyncio.run(run())
