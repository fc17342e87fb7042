"""The clients and genrec-client end to end: a real tritonserver process (conftest.py), real gRPC.

The wire (what the server accepts and answers), the status mapping, retries and their backoff,
timeouts, readiness, the concurrent batch methods, the asyncio client and the command line.
Transient failures come from a closed port (UNAVAILABLE) and a deadline too short for any answer
(DEADLINE_EXCEEDED); server errors from requests the served model rejects.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from server_constants import RETRIEVE_K, WINDOW_BLOCK
from triton_stats import inferences, model_stats, settled, steady

from genrec.builders.tritonserver import TritonServer
from genrec.client import GenrecError, Ranking, Recommendations, RecommendClient, protocol, wire
from genrec.client.aio import AsyncRecommendClient
from genrec.client.cli import main
from genrec.training.checkpoint import load_checkpoint
from genrec.training.pipeline import window_start

pytestmark = pytest.mark.server
UNKNOWN = 10**12  # an item id the model has never seen


@dataclass(frozen=True)
class Catalog:
    item_ids: list[int]  # the raw ids the model knows
    max_len: int  # the model's longest history; older events are truncated

    def history(self, n: int, start: int = 0) -> list[int]:
        return [self.item_ids[(start + i) % len(self.item_ids)] for i in range(n)]


@pytest.fixture(scope="module")
def catalog(tiny_checkpoint: Path) -> Catalog:
    _, meta = load_checkpoint(tiny_checkpoint)
    return Catalog([int(i) for i in meta.item_raw_ids], meta.model_config.max_len)


def _closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def _inferences(server: TritonServer, model: str = "recommender") -> int:
    """How many requests reached the model: recommender serves recommend and rank."""
    return inferences(server.url, model)


def _successes(server: TritonServer, model: str) -> int:
    return int(model_stats(server.url, model)["inference_stats"]["success"].get("count", 0))


def _assert_top_k(recs: Recommendations, k: int, catalog: Catalog, history: list[int]) -> None:
    assert len(recs) == k
    assert recs.item_ids.dtype == np.int64 and recs.scores.dtype == np.float32
    assert len(set(recs.item_ids.tolist())) == k and set(recs.item_ids.tolist()) <= set(catalog.item_ids)
    assert not set(recs.item_ids.tolist()) & set(history)  # exclude_seen
    assert np.all(np.isfinite(recs.scores)) and np.all(np.diff(recs.scores) <= 0)  # best first


def _assert_same_ranking(a: Ranking, b: Ranking, counts: bool = True) -> None:
    assert a.candidate_ids.tolist() == b.candidate_ids.tolist()
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
    assert not counts or (a.num_unknown, a.num_truncated) == (b.num_unknown, b.num_truncated)


def _assert_same_top_k(a: Recommendations, b: Recommendations, counts: bool = True) -> None:
    assert a.item_ids.tolist() == b.item_ids.tolist()
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
    assert not counts or (a.num_unknown, a.num_truncated) == (b.num_unknown, b.num_truncated)


# -- the wire -------------------------------------------------------------------------------------


def test_served_ensembles_speak_the_protocol(server: TritonServer) -> None:
    """The server's own metadata of recommend, rank and retrieve is exactly `protocol.ENDPOINTS`."""
    with grpcclient.InferenceServerClient(server.url) as raw:
        for name, endpoint in protocol.ENDPOINTS.items():
            meta = raw.get_model_metadata(name, as_json=True)
            served_inputs = {t["name"]: t["datatype"] for t in meta["inputs"]}
            served_outputs = {t["name"]: t["datatype"] for t in meta["outputs"]}
            assert served_inputs == {t.name: t.dtype for t in endpoint.inputs}
            assert served_outputs == {t.name: t.dtype for t in endpoint.outputs}


def test_recommend_returns_ordered_items(
    client: RecommendClient, server: TritonServer, catalog: Catalog
) -> None:
    history = catalog.history(6, start=3)
    before = steady(lambda: {model: _successes(server, model) for model in protocol.ENDPOINTS})
    recs = client.recommend(history, k=8, timestamps=[10, 20, 30, 40, 50, 60], actions=[0, 5, 1, 2, 3, 4])
    expected = {protocol.RECOMMEND: 1, protocol.RANK: 0, protocol.RETRIEVE: 0}
    counted = settled(
        lambda: {model: _successes(server, model) - before[model] for model in protocol.ENDPOINTS},
        lambda counted: counted == expected,
    )
    assert counted == expected
    _assert_top_k(recs, 8, catalog, history)
    assert (recs.num_unknown, recs.num_truncated) == (0, 0)
    assert [item.item_id for item in recs] == recs.item_ids.tolist()
    retrieved = client.retrieve(history, k=8, timestamps=[10, 20, 30, 40, 50, 60])
    _assert_top_k(retrieved, 8, catalog, history)
    ranking = client.rank(history, recs.item_ids.tolist())
    assert ranking.candidate_ids.tolist() == recs.item_ids.tolist() and ranking.scores.dtype == np.float32
    assert [item.score for item in ranking.ordered()] == sorted(ranking.scores.tolist(), reverse=True)


def test_a_user_who_has_seen_nearly_everything_gets_the_rest_beside_normal_users(
    client: RecommendClient, catalog: Catalog
) -> None:
    """All but 3 items seen (fewer unseen than the retrieval depth): that user's recommend and retrieve are OK
    with the 3 unseen items, and normal users sent in the same concurrent batch get their usual answers."""
    heavy, unseen = catalog.item_ids[3:], set(catalog.item_ids[:3])
    normal = catalog.history(6, start=40)
    expected = client.recommend(normal, k=3)
    answers = client.recommend_batch([normal, heavy, normal, heavy], k=3)
    for answer in answers[1::2]:
        assert set(answer.item_ids.tolist()) == unseen and np.all(np.isfinite(answer.scores))
    for answer in answers[::2]:
        _assert_same_top_k(answer, expected)
    assert set(client.retrieve(heavy, k=3).item_ids.tolist()) == unseen
    assert set(client.recommend(heavy, k=5).item_ids.tolist()) == unseen  # fewer than asked: all that is left
    assert set(client.retrieve(heavy, k=5).item_ids.tolist()) == unseen


def test_default_timestamps_are_now_and_actions_unknown(client: RecommendClient, catalog: Catalog) -> None:
    """No timestamps: every event at int(time.time()), so the model sees no time gaps; actions 0."""
    history = catalog.history(7, start=11)
    default = client.recommend(history, k=10)
    now = int(time.time())
    explicit = client.recommend(history, k=10, timestamps=[now] * 7, actions=[0] * 7)
    _assert_same_top_k(default, explicit)
    with_time = client.recommend(history, k=10, timestamps=[now - 86_400 * (7 - i) for i in range(7)])
    assert not np.allclose(with_time.scores, default.scores)  # timestamps reach the model at all
    long = catalog.history(catalog.max_len)
    included = client.retrieve(long, k=RETRIEVE_K, exclude_seen=False)
    assert len(included) == RETRIEVE_K and set(included.item_ids.tolist()) & set(long)  # exclude_seen=False


def test_unknown_and_truncated_history_is_reported(client: RecommendClient, catalog: Catalog) -> None:
    """Unknown ids are ignored; the oldest known events beyond the model's max length are dropped, a block
    at a time."""
    history = [UNKNOWN, *catalog.history(catalog.max_len + 3)]
    recs = client.recommend(history, k=3, exclude_seen=False)
    ranking = client.rank(history, catalog.item_ids[:4])
    dropped = window_start(catalog.max_len + 3, catalog.max_len, WINDOW_BLOCK)
    assert dropped == WINDOW_BLOCK
    assert (recs.num_unknown, recs.num_truncated) == (1, dropped)
    assert (ranking.num_unknown, ranking.num_truncated) == (1, dropped)
    kept = history[1 + dropped :]
    _assert_same_top_k(recs, client.recommend(kept, k=3, exclude_seen=False), counts=False)
    _assert_same_ranking(ranking, client.rank(kept, catalog.item_ids[:4]), counts=False)
    short = client.recommend([UNKNOWN, UNKNOWN + 1, *catalog.history(3)], k=3)
    assert (short.num_unknown, short.num_truncated) == (2, 0)


# -- errors, retries, timeouts --------------------------------------------------------------------


def test_server_errors_are_not_retried(server: TritonServer, catalog: Catalog) -> None:
    """INVALID_ARGUMENT from the server: one attempt, whatever `retries` says, and no backoff."""
    history = catalog.history(4)
    attempts = {}
    for retries in (0, 3):
        with RecommendClient(server.url, timeout_s=60, retries=retries) as client:
            before = steady(lambda: _inferences(server, "user_encoder"))  # retrieve's first step
            with pytest.raises(GenrecError) as info:
                client.retrieve(history, k=RETRIEVE_K + 1)
            after = settled(lambda: _inferences(server, "user_encoder"), lambda n: n > before)  # noqa: B023 (called here)
            attempts[retries] = after - before
        err = info.value
        assert (err.status, err.model) == ("INVALID_ARGUMENT", protocol.RETRIEVE)
        assert f"k must be in 1..{RETRIEVE_K}" in str(err) and server.url in str(err)
    assert attempts == {0: 1, 3: 1}


def test_transient_errors_are_retried_with_backoff() -> None:
    """A closed port is UNAVAILABLE at once; each retry waits its jittered backoff first (half to all of
    0.1, 0.2, 0.4, ... s)."""
    url = _closed_port()
    elapsed = {}
    for retries in (0, 4):
        with RecommendClient(url, timeout_s=5.0, retries=retries) as client:
            start = time.perf_counter()
            with pytest.raises(GenrecError) as info:
                client.recommend([1, 2], k=2)
            elapsed[retries] = time.perf_counter() - start
        err = info.value
        assert (err.status, err.model) == ("UNAVAILABLE", protocol.RECOMMEND) and url in str(err)
    backoff = sum(wire.backoff_s(attempt) for attempt in range(4))
    assert backoff == pytest.approx(1.5)
    assert elapsed[0] < backoff / 2 <= elapsed[4]  # the retries waited their backoff ...
    assert elapsed[4] < backoff + 5 * 5.0  # ... and no attempt waited for its timeout


def test_timeout_is_deadline_exceeded_and_not_retried(server: TritonServer, catalog: Catalog) -> None:
    with RecommendClient(server.url, timeout_s=1e-4, retries=3) as client:
        start = time.perf_counter()
        with pytest.raises(GenrecError) as info:
            client.rank(catalog.history(3), catalog.item_ids[:3])
        elapsed = time.perf_counter() - start
    assert (info.value.status, info.value.model) == ("DEADLINE_EXCEEDED", protocol.RANK)
    assert elapsed < wire.backoff_s(0) / 2  # one attempt: no backoff was waited


def test_tls_against_a_plaintext_server_says_so_and_is_not_retried(server: TritonServer, catalog: Catalog) -> None:
    with RecommendClient(server.url, timeout_s=5.0, retries=3, ssl=True) as client:
        assert client.ready() is False
        start = time.perf_counter()
        with pytest.raises(GenrecError) as info:
            client.recommend(catalog.history(3))
        elapsed = time.perf_counter() - start
    assert info.value.status == "UNAVAILABLE" and wire.TLS_MISMATCH in str(info.value), info.value
    assert elapsed < wire.backoff_s(0) / 2  # one attempt: no backoff was waited


def test_ready(server: TritonServer) -> None:
    with RecommendClient(server.url) as client:
        assert client.ready() is True
    with RecommendClient(_closed_port(), timeout_s=2.0) as client:
        assert client.ready() is False


# -- many users -----------------------------------------------------------------------------------


def test_batch_variants_are_in_order_and_equal_single_calls(
    client: RecommendClient, catalog: Catalog
) -> None:
    histories = [catalog.history(n, start=7 * n) for n in (1, 5, 2, 30, 9, catalog.max_len + 4)]
    timestamps = [None, list(range(100, 105)), None, None, list(range(9)), None]
    actions = [[1], None, [0, 2], None, None, None]
    candidates = [catalog.item_ids[i : i + 3 + i % 4] for i in range(len(histories))]
    kwargs = [dict(timestamps=t, actions=a) for t, a in zip(timestamps, actions, strict=True)]
    # timestamps default to "now": all events at one instant, whatever instant, give the same answer
    recommended = client.recommend_batch(histories, k=6, timestamps=timestamps, actions=actions)
    retrieved = client.retrieve_batch(
        histories, k=6, timestamps=timestamps, actions=actions, exclude_seen=False
    )
    ranked = client.rank_batch(histories, candidates, timestamps=timestamps, actions=actions)
    assert len(recommended) == len(retrieved) == len(ranked) == len(histories)
    for i, history in enumerate(histories):
        _assert_same_top_k(recommended[i], client.recommend(history, k=6, **kwargs[i]))
        _assert_same_top_k(retrieved[i], client.retrieve(history, k=6, exclude_seen=False, **kwargs[i]))
        _assert_same_ranking(ranked[i], client.rank(history, candidates[i], **kwargs[i]))
        assert ranked[i].candidate_ids.tolist() == candidates[i]


def test_batch_error_names_the_user(client: RecommendClient, catalog: Catalog) -> None:
    with pytest.raises(
        GenrecError,
        match=r"^user_seqs\[2\]: recommend at .*\[INVALID_ARGUMENT\].*none of the 1 history item ids",
    ) as info:
        client.recommend_batch([catalog.history(3), catalog.history(4), [UNKNOWN], catalog.history(2)], k=2)
    assert (info.value.status, info.value.model) == ("INVALID_ARGUMENT", protocol.RECOMMEND)
    with pytest.raises(GenrecError, match=r"^user_seqs\[1\]: .*never seen"):
        client.rank_batch([catalog.history(3), catalog.history(3)], [catalog.item_ids[:2], [UNKNOWN]])


# -- asyncio --------------------------------------------------------------------------------------


def test_async_client_equals_the_blocking_one(
    client: RecommendClient, server: TritonServer, catalog: Catalog
) -> None:
    histories = [catalog.history(n, start=n) for n in (3, 8, 1)]
    candidates = catalog.item_ids[20:26]
    expected_recommend = client.recommend(histories[0], k=5)
    expected_retrieve = client.retrieve(histories[1], k=4, exclude_seen=False)
    expected_rank = client.rank(histories[2], candidates)
    expected_batch = client.recommend_batch(histories, k=3)

    async def run() -> None:
        async with AsyncRecommendClient(server.url, timeout_s=60, retries=1) as aclient:
            assert await aclient.ready() is True
            _assert_same_top_k(await aclient.recommend(histories[0], k=5), expected_recommend)
            _assert_same_top_k(
                await aclient.retrieve(histories[1], k=4, exclude_seen=False), expected_retrieve
            )
            _assert_same_ranking(await aclient.rank(histories[2], candidates), expected_rank)
            batch = await aclient.recommend_batch(histories, k=3)
            for got, expected in zip(batch, expected_batch, strict=True):
                _assert_same_top_k(got, expected)
            retrieved = await aclient.retrieve_batch(histories, k=2)
            assert [len(r) for r in retrieved] == [2, 2, 2]
            ranked = await aclient.rank_batch(histories, [candidates, candidates[:2], candidates[3:]])
            assert [r.candidate_ids.tolist() for r in ranked] == [candidates, candidates[:2], candidates[3:]]
            with pytest.raises(GenrecError) as info:
                await aclient.retrieve(histories[0], k=RETRIEVE_K + 1)
            assert info.value.status == "INVALID_ARGUMENT"
            with pytest.raises(GenrecError, match=r"^user_seqs\[1\]: recommend at .*\[INVALID_ARGUMENT\]"):
                await aclient.recommend_batch([histories[0], [UNKNOWN]], k=2)
            with pytest.raises(GenrecError, match=r"^user_seqs\[1\] is empty"):
                await aclient.rank_batch([histories[0], []], [candidates, candidates])

    asyncio.run(run())


def test_async_client_unreachable() -> None:
    url = _closed_port()

    async def run() -> float:
        async with AsyncRecommendClient(url, timeout_s=2.0, retries=2) as aclient:
            assert await aclient.ready() is False
            start = time.perf_counter()
            with pytest.raises(GenrecError) as info:
                await aclient.recommend([1])
            assert (info.value.status, info.value.model) == ("UNAVAILABLE", protocol.RECOMMEND)
            assert url in str(info.value)
            return time.perf_counter() - start

    assert asyncio.run(run()) >= (wire.backoff_s(0) + wire.backoff_s(1)) / 2  # retried twice, after backoff


# -- genrec-client ----------------------------------------------------------------------------------


def test_cli_recommend_json(
    client: RecommendClient, server: TritonServer, catalog: Catalog, capsys: pytest.CaptureFixture[str]
) -> None:
    history = catalog.history(4, start=40)
    items = ",".join(map(str, [*history, UNKNOWN]))
    assert main(["recommend", "--url", server.url, "--items", items, "-k", "5", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    expected = client.recommend([*history, UNKNOWN], k=5)
    assert [item["item_id"] for item in payload["items"]] == expected.item_ids.tolist()
    np.testing.assert_allclose([item["score"] for item in payload["items"]], expected.scores, 1e-5, 1e-5)
    assert (payload["num_unknown"], payload["num_truncated"]) == (1, 0)


def test_cli_rank_table_is_best_first(
    client: RecommendClient, server: TritonServer, catalog: Catalog, capsys: pytest.CaptureFixture[str]
) -> None:
    history, candidates = [*catalog.history(3), UNKNOWN], catalog.item_ids[50:55]
    argv = ["rank", "--url", server.url, "--items", ",".join(map(str, history))]
    assert main([*argv, "--candidates", ",".join(map(str, candidates))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "item_id", "score"]
    rows = [line.split() for line in lines[1:6]]
    assert [row[0] for row in rows] == ["1", "2", "3", "4", "5"]
    assert [int(row[1]) for row in rows] == [
        item.item_id for item in client.rank(history, candidates).ordered()
    ]
    scores = [float(row[2]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    assert lines[6:] == ["history: 1 unknown ids ignored, 0 oldest events truncated"]


def test_cli_ready(server: TritonServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ready", "--url", server.url]) == 0
    assert capsys.readouterr().out.strip() == "ready"
    closed = _closed_port()
    assert main(["ready", "--url", closed, "--timeout", "2"]) == 1
    assert capsys.readouterr().out.strip() == f"not ready: {closed}"


def test_cli_server_error_exits_1(
    server: TritonServer, catalog: Catalog, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["retrieve", "--url", server.url, "--items", "1,2", "-k", str(RETRIEVE_K + 1)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("genrec-client: error: retrieve at ") and "[INVALID_ARGUMENT]" in err
    assert "Traceback" not in err
