"""End to end through a real tritonserver process and real gRPC: served == offline, bad input, batching.

One server per runtime (the package-scoped, parametrised `server` of conftest.py); every test reuses it.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from server_constants import BUILT_FILES, RETRIEVE_K, WINDOW_BLOCK, repository_files
from triton_stats import model_stats, settled, steady
from tritonclient.utils import InferenceServerException

from genrec.builders.limits import Limits
from genrec.builders.requests import Catalogue, parse_history
from genrec.builders.tritonserver import TritonServer
from genrec.client import GenrecError, RecommendClient, protocol
from genrec.training.batch import SequenceBatch
from genrec.training.checkpoint import load_checkpoint, load_meta
from genrec.training.hstu import HSTU
from genrec.training.pipeline import recommend as recommend_offline
from genrec.training.pipeline import window_start
from genrec.training.prepare import DataConfig, prepare

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def users(tiny_data: DataConfig):
    """Raw-id histories of real users of the tiny model's data (the test split's histories)."""
    data, split, _ = prepare(tiny_data)
    test = split.test.histories
    rows = list(range(0, len(test), 15))[:20]
    out = []
    for r in rows:
        lo, hi = test.offsets[r], test.offsets[r + 1]
        out.append((data.item_vocab.to_raw(test.items[lo:hi]), test.timestamps[lo:hi],
                    np.concatenate([[0.0], data.action_values])[test.actions[lo:hi]].astype(np.int64)))
    return out


def test_served_equals_offline(client: RecommendClient, tiny_checkpoint: Path, users) -> None:
    """Contract 4: the same items in the same order as the in-process pipeline; scores to fp32 noise. The
    offline side gets its input from `parse_history`, the function the served models call (no copy here)."""
    model, meta = load_checkpoint(tiny_checkpoint)
    assert isinstance(model, HSTU)
    catalogue = Catalogue.from_meta(meta)
    for items, timestamps, ratings in users:
        served = client.recommend(items.tolist(), k=10, timestamps=timestamps.tolist(), actions=ratings.tolist())
        request = {protocol.HISTORY_ITEM_IDS: items[None], protocol.HISTORY_TIMESTAMPS: timestamps[None],
                   protocol.HISTORY_ACTIONS: ratings[None]}
        history = parse_history(request, catalogue, model.config.max_len, block=WINDOW_BLOCK)
        batch = SequenceBatch.from_lists([history.items.tolist()], [history.timestamps.tolist()],
                                         [history.actions.tolist()])
        seen = torch.from_numpy(history.seen[None])  # never recommends anything from the whole history
        ids, scores = recommend_offline(model, batch, k=10, retrieve_k=RETRIEVE_K, seen=seen)
        offline = catalogue.vocab.to_raw(ids[0].numpy())
        assert served.item_ids.tolist() == offline.tolist()
        np.testing.assert_allclose(served.scores, scores[0].numpy(), rtol=1e-4, atol=1e-4)
        assert not set(served.item_ids.tolist()) & set(items.tolist())  # exclude_seen


def test_rank_and_retrieve_agree_with_recommend(client: RecommendClient, users) -> None:
    items, timestamps, ratings = users[0]
    kwargs = dict(timestamps=timestamps.tolist(), actions=ratings.tolist())
    top = client.recommend(items.tolist(), k=5, **kwargs)
    retrieved = client.retrieve(items.tolist(), k=RETRIEVE_K, **kwargs)
    assert set(top.item_ids.tolist()) <= set(retrieved.item_ids.tolist())
    ranking = client.rank(items.tolist(), retrieved.item_ids.tolist(), **kwargs)
    assert ranking.ordered()[:5] == tuple(top.items)


def test_batched_concurrent_requests_match_sequential(client: RecommendClient, server: TritonServer, users) -> None:
    """Histories of different lengths share batches (dynamic + ragged batching) with identical results."""
    sequential = [client.recommend(u[0].tolist(), k=10, timestamps=u[1].tolist()) for u in users]
    shared = []
    for _ in range(3):  # whether requests meet in the queue is up to the machine's timing: up to 3 rounds
        stats_before = steady(lambda: _executions(server))
        batched = client.recommend_batch([u[0].tolist() for u in users], k=10,
                                         timestamps=[u[1].tolist() for u in users])
        executions, inferences = np.subtract(
            settled(lambda: _executions(server), lambda now: now[1] - stats_before[1] >= len(users)),  # noqa: B023
            stats_before)
        assert [b.item_ids.tolist() for b in batched] == [s.item_ids.tolist() for s in sequential]
        assert inferences == len(users)
        shared.append(executions < inferences)  # some requests were executed together
        if shared[-1]:
            break
    assert any(shared), f"{len(users)} concurrent requests never shared an execution in 3 rounds"


def _executions(server: TritonServer) -> tuple[int, int]:
    stats = model_stats(server.url, "recommender")
    return int(stats.get("execution_count", 0)), int(stats.get("inference_count", 0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(user_seq=[]), "user_seq"),
        (dict(user_seq=[1, 2], k=0), "k"),
        (dict(user_seq=[1, 2], k=-3), "k"),
        (dict(user_seq=[1, 2], timestamps=[5.0, float("nan")]), "timestamps"),
        (dict(user_seq=[1, 2], timestamps=[10, 5]), "timestamps"),
        (dict(user_seq=[1, 2], timestamps=[10]), "timestamps"),
        (dict(user_seq=[1, 2], actions=[-1, 3]), "actions"),
    ],
)
def test_bad_input_through_the_client(client: RecommendClient, kwargs: dict, message: str) -> None:
    with pytest.raises(GenrecError, match=message):
        client.recommend(**kwargs)


def test_unknown_out_of_range_and_too_long_histories(client: RecommendClient, tiny_checkpoint: Path) -> None:
    _, meta = load_checkpoint(tiny_checkpoint)
    known = meta.item_raw_ids[:5].tolist()
    with pytest.raises(GenrecError, match="none of the 2 history item ids is known"):
        client.recommend([10**9, -7])
    with_unknown = client.recommend([*known, 10**12, -1], k=5)
    assert with_unknown.num_unknown == 2
    assert with_unknown.item_ids.tolist() == client.recommend(known, k=5).item_ids.tolist()
    max_len = meta.model_config.max_len
    long = (meta.item_raw_ids[np.arange(max_len + 25) % len(meta.item_raw_ids)]).tolist()
    truncated = client.recommend(long, k=5, exclude_seen=False)
    dropped = window_start(len(long), max_len, WINDOW_BLOCK)
    assert truncated.num_truncated == dropped == 28  # the window moves in blocks of WINDOW_BLOCK
    assert truncated.item_ids.tolist() == client.recommend(long[dropped:], k=5, exclude_seen=False).item_ids.tolist()
    with pytest.raises(GenrecError, match=rf"k must be in 1\.\.{RETRIEVE_K}"):  # the caller's name for it
        client.recommend(known, k=RETRIEVE_K + 1)
    with pytest.raises(GenrecError, match="never seen"):
        client.rank(known, [known[0], 10**9])


def _raw_request(server: TritonServer, inputs: list[grpcclient.InferInput], model: str = protocol.RECOMMEND):
    with grpcclient.InferenceServerClient(server.url) as raw:
        return raw.infer(model, inputs)


def _input(name: str, array: np.ndarray, dtype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def _history(items: np.ndarray, timestamps: np.ndarray | None = None, ts_dtype: str = "INT64"):
    """A raw request; its batch dimension is items' first (the API allows only 1)."""
    b, n = items.shape
    timestamps = np.tile(np.arange(n, dtype=np.int64), (b, 1)) if timestamps is None else timestamps
    return [
        _input(protocol.HISTORY_ITEM_IDS, items, "INT64"),
        _input(protocol.HISTORY_TIMESTAMPS, timestamps, ts_dtype),
        _input(protocol.HISTORY_ACTIONS, np.zeros(items.shape, np.int64), "INT64"),
        _input(protocol.K, np.full((b, 1), 3, np.int32), "INT32"),
        _input(protocol.EXCLUDE_SEEN, np.ones((b, 1), bool), "BOOL"),
    ]


def test_bad_raw_requests_get_clear_errors_and_server_stays_correct(server: TritonServer, tiny_checkpoint: Path) -> None:
    _, meta = load_checkpoint(tiny_checkpoint)
    known = meta.item_raw_ids[:4][None].astype(np.int64)
    good = _raw_request(server, _history(known)).as_numpy(protocol.ITEM_IDS)
    cases = [
        (_history(np.zeros((1, 0), np.int64)), "empty"),
        ([_input(protocol.HISTORY_ITEM_IDS, known.astype(np.float32), "FP32"), *_history(known)[1:]], "FP32"),
        (_history(np.repeat(known, 2, axis=0)), "one user per request"),
        (_history(known, np.array([[0.0, 1.0, float("nan"), 3.0]], np.float32), "FP32"), "FP32"),
        (_history(known)[:3], "missing"),
    ]
    for inputs, message in cases:
        with pytest.raises(InferenceServerException, match=message):
            _raw_request(server, inputs)
    with grpcclient.InferenceServerClient(server.url) as raw:
        assert raw.is_server_ready()
        assert all(raw.is_model_ready(m) for m in (protocol.RECOMMEND, protocol.RANK, protocol.RETRIEVE))
    assert _raw_request(server, _history(known)).as_numpy(protocol.ITEM_IDS).tolist() == good.tolist()


def test_requests_over_a_limit_or_out_of_range_are_invalid_argument_naming_the_input(
    server: TritonServer, tiny_checkpoint: Path
) -> None:
    """k beyond retrieve_k, too many candidates, too many events and timestamps outside unix seconds (here
    milliseconds, a unit mistake) are refused by the first step, before any prefill, with the input's name."""
    _, meta = load_checkpoint(tiny_checkpoint)
    known = meta.item_raw_ids[:4][None].astype(np.int64)
    limits = Limits()
    many = np.resize(meta.item_raw_ids, limits.max_candidates + 1)[None].astype(np.int64)
    long = np.resize(meta.item_raw_ids, limits.max_history_events + 1)[None].astype(np.int64)
    with_k = _history(known)
    with_k[3] = _input(protocol.K, np.array([[RETRIEVE_K + 1]], np.int32), "INT32")
    cases = [
        (protocol.RECOMMEND, with_k, rf"'{protocol.K}' must be in 1\.\.{RETRIEVE_K}"),
        (protocol.RETRIEVE, with_k, rf"'{protocol.K}' must be in 1\.\.{RETRIEVE_K}"),
        (protocol.RANK, [*_history(known)[:3], _input(protocol.CANDIDATE_ITEM_IDS, many, "INT64")],
         f"'{protocol.CANDIDATE_ITEM_IDS}' has {limits.max_candidates + 1} candidates, more than"),
        (protocol.RECOMMEND, _history(long), f"has {limits.max_history_events + 1} events, more than"),
        (protocol.RECOMMEND, _history(known, np.array([[1, 2, 3, 1_700_000_000_000]])),
         rf"'?{protocol.HISTORY_TIMESTAMPS}\[3\]=1700000000000 is not unix seconds"),
        (protocol.RANK, [*_history(known, np.array([[-5, 2, 3, 4]]))[:3],
                         _input(protocol.CANDIDATE_ITEM_IDS, known, "INT64")], "is not unix seconds"),
    ]
    for model, inputs, message in cases:
        with pytest.raises(InferenceServerException, match=message) as error:
            _raw_request(server, inputs, model)
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT", (model, error.value)


def test_prometheus_counts_requests_by_outcome_and_unknown_ids(client: RecommendClient, server: TritonServer,
                                                                 tiny_checkpoint: Path) -> None:
    known = load_meta(tiny_checkpoint).item_raw_ids[:4].tolist()
    series = {
        "ok": 'genrec_requests_total{model="recommender",outcome="ok"}',
        "invalid": 'genrec_requests_total{model="recommender",outcome="invalid_argument"}',
        "unknown": 'genrec_history_unknown_total{model="recommender"}',
        "events": 'genrec_history_events_count{model="recommender"}',
        "candidates": 'genrec_candidates_count{model="recommender"}',
    }
    before = {name: server.metric(line) for name, line in series.items()}
    client.recommend([*known, 10**12, -3], k=3)  # two unknown ids
    client.rank(known, known[:2])  # rank is served by the same model: its candidates histogram
    with pytest.raises(GenrecError):
        client.recommend([10**9])
    expected = {"ok": 2, "invalid": 1, "unknown": 2, "events": 3, "candidates": 1}
    after = {name: server.metric(line, lambda v, n=name: v - before[n] >= expected[n])  # type: ignore[misc]
             for name, line in series.items()}
    assert {name: after[name] - before[name] for name in series} == expected


def test_loading_the_repository_changed_none_of_its_files(server: TritonServer) -> None:
    """Nothing is written into a version folder at load (a __pycache__ there made the poller load every
    version twice)."""
    assert repository_files(server.config.repository) == BUILT_FILES[server.config.repository]


def test_many_concurrent_mixed_good_and_bad_requests(client: RecommendClient, users) -> None:
    """Bad requests batched with good ones fail alone; the good ones are answered correctly."""
    expected = [client.recommend(u[0].tolist(), k=5).item_ids.tolist() for u in users[:6]]

    def call(i: int):
        if i % 2:
            with pytest.raises(GenrecError):
                client.recommend([10**9 + i], k=5)
            return None
        return client.recommend(users[(i // 2) % 6][0].tolist(), k=5).item_ids.tolist()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(24)))
    assert [r for r in results if r is not None] == [expected[(i // 2) % 6] for i in range(0, 24, 2)]
