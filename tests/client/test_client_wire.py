"""Requests carry the protocol's names, dtypes and shapes; real Triton responses parse into results."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest
from tritonclient.grpc import InferResult
from tritonclient.utils import InferenceServerException

from genrec.client import GenrecError, Ranking, Recommendations, ScoredItem, protocol, wire
from genrec.client.validate import History

HISTORY = History(
    item_ids=np.array([5, 9, 2, 7], dtype=np.int64),
    timestamps=np.array([10, 20, 20, 30], dtype=np.int64),
    actions=np.array([0, 4, 5, 1], dtype=np.int64),
)


@pytest.mark.parametrize("model", [protocol.RECOMMEND, protocol.RETRIEVE])
def test_top_k_request_follows_the_protocol(model: str) -> None:
    call = wire.top_k_call(model, HISTORY, k=7, exclude_seen=False)
    endpoint = protocol.ENDPOINTS[model]
    required = [t for t in endpoint.inputs if not t.optional]  # user_id only when the caller names one
    assert call.model == model and call.user_id is None
    assert [i.name() for i in call.inputs] == [t.name for t in required]
    assert [i.datatype() for i in call.inputs] == [t.dtype for t in required]
    shapes = {i.name(): i.shape() for i in call.inputs}
    for name in (protocol.HISTORY_ITEM_IDS, protocol.HISTORY_TIMESTAMPS, protocol.HISTORY_ACTIONS):
        assert shapes[name] == [1, 4]  # batch dim 1, L = 4
    assert shapes[protocol.K] == [1, 1] and shapes[protocol.EXCLUDE_SEEN] == [1, 1]
    assert [o.name() for o in call.outputs] == [t.name for t in endpoint.outputs]


def test_a_user_id_is_sent_as_one_string_and_routes_the_call() -> None:
    call = wire.top_k_call(protocol.RECOMMEND, HISTORY, k=7, exclude_seen=True, user_id="user-42")
    sent = {i.name(): i for i in call.inputs}
    assert (sent[protocol.USER_ID].datatype(), sent[protocol.USER_ID].shape()) == ("BYTES", [1, 1])
    assert call.user_id == "user-42" and wire.rank_call(HISTORY, np.array([1]), "u").user_id == "u"


def test_rendezvous_routing_is_stable_spread_and_fails_over_to_the_same_next_replica() -> None:
    urls = [f"replica-{i}:8001" for i in range(3)]
    router = wire.Router(urls)
    orders = {f"user-{u}": router.order(f"user-{u}") for u in range(300)}
    assert all(sorted(order) == [0, 1, 2] for order in orders.values())
    assert orders == {user: wire.Router(list(urls)).order(user) for user in orders}  # every client agrees
    homes = [order[0] for order in orders.values()]
    assert all(60 < homes.count(r) < 140 for r in range(3))  # spread about evenly
    # Without replica 0, its users move to their second choice; nobody else moves.
    survivors = wire.Router(urls[1:])
    for user, order in orders.items():
        moved = survivors.order(user)[0] + 1
        assert moved == (order[1] if order[0] == 0 else order[0])
    assert [router.order(None)[0] for _ in range(4)] == [0, 1, 2, 0]  # no user id: in turn


def test_rank_request_follows_the_protocol() -> None:
    call = wire.rank_call(HISTORY, np.array([1, 2, 3], dtype=np.int64))
    endpoint = protocol.ENDPOINTS[protocol.RANK]
    assert call.model == protocol.RANK
    assert [(i.name(), i.datatype(), i.shape()) for i in call.inputs] == [
        (protocol.HISTORY_ITEM_IDS, "INT64", [1, 4]),
        (protocol.HISTORY_TIMESTAMPS, "INT64", [1, 4]),
        (protocol.HISTORY_ACTIONS, "INT64", [1, 4]),
        (protocol.CANDIDATE_ITEM_IDS, "INT64", [1, 3]),
    ]
    assert [o.name() for o in call.outputs] == [t.name for t in endpoint.outputs]


def test_inputs_must_match_the_endpoint() -> None:
    with pytest.raises(ValueError, match="rank takes"):
        wire.infer_inputs(protocol.ENDPOINTS[protocol.RANK], {protocol.HISTORY_ITEM_IDS: HISTORY.item_ids})


def _top_k_outputs(
    ids: list[int], scores: list[float], unknown: int = 0, truncated: int = 0
) -> dict[str, np.ndarray]:
    return {
        protocol.ITEM_IDS: np.array(ids, dtype=np.int64),
        protocol.SCORES: np.array(scores, dtype=np.float32),
        protocol.NUM_UNKNOWN: np.array([unknown], dtype=np.int32),
        protocol.NUM_TRUNCATED: np.array([truncated], dtype=np.int32),
        protocol.CACHED_EVENTS: np.array([0], dtype=np.int32),
    }


def test_parse_top_k(make_result: Callable[..., InferResult]) -> None:
    result = make_result(
        protocol.RECOMMEND, _top_k_outputs([42, 7, 13], [3.0, 2.5, -1.0], unknown=2, truncated=5)
    )
    recs = wire.top_k_call(protocol.RECOMMEND, HISTORY, 3, True).parse(result)
    assert isinstance(recs, Recommendations)
    assert recs.items == (ScoredItem(42, 3.0), ScoredItem(7, 2.5), ScoredItem(13, -1.0))
    assert (recs.num_unknown, recs.num_truncated) == (2, 5)
    assert len(recs) == 3 and recs[0] == ScoredItem(42, 3.0) and list(recs) == list(recs.items)
    assert recs.item_ids.dtype == np.int64 and recs.item_ids.tolist() == [42, 7, 13]
    assert recs.scores.dtype == np.float32 and recs.scores.tolist() == [3.0, 2.5, -1.0]
    assert all(type(item.item_id) is int and type(item.score) is float for item in recs)


def test_parse_empty_top_k(make_result: Callable[..., InferResult]) -> None:
    recs = wire.parse_top_k(make_result(protocol.RETRIEVE, _top_k_outputs([], [])), protocol.RETRIEVE)
    assert len(recs) == 0 and recs.item_ids.shape == (0,)


def test_parse_rank_keeps_candidate_order(make_result: Callable[..., InferResult]) -> None:
    candidates = np.array([11, 22, 33, 44], dtype=np.int64)
    outputs = {
        protocol.SCORES: np.array([0.5, 2.0, np.nan, 2.0], dtype=np.float32),
        protocol.NUM_UNKNOWN: np.array([1], dtype=np.int32),
        protocol.NUM_TRUNCATED: np.array([0], dtype=np.int32),
        protocol.CACHED_EVENTS: np.array([3], dtype=np.int32),
    }
    ranking = wire.rank_call(HISTORY, candidates).parse(make_result(protocol.RANK, outputs))
    assert isinstance(ranking, Ranking)
    assert ranking.candidate_ids.tolist() == [11, 22, 33, 44] and len(ranking) == 4
    np.testing.assert_array_equal(ranking.scores, np.array([0.5, 2.0, np.nan, 2.0], dtype=np.float32))
    assert [item.item_id for item in ranking.ordered()] == [22, 44, 11, 33]  # ties keep order, NaN last
    assert (ranking.num_unknown, ranking.num_truncated, ranking.cached_events) == (1, 0, 3)
    with pytest.raises(ValueError):
        ranking.scores[0] = 1.0  # read-only


def test_malformed_responses_raise(make_result: Callable[..., InferResult]) -> None:
    outputs = _top_k_outputs([1, 2], [1.0, 0.5])
    missing = {name: array for name, array in outputs.items() if name != protocol.NUM_TRUNCATED}
    with pytest.raises(GenrecError, match="recommend: the response has no output 'num_truncated'") as info:
        wire.parse_top_k(make_result(protocol.RECOMMEND, missing), protocol.RECOMMEND)
    assert info.value.model == protocol.RECOMMEND and info.value.status is None
    wrong_dtype = {**outputs, protocol.SCORES: np.array([1.0, 0.5], dtype=np.float64)}
    with pytest.raises(GenrecError, match="output 'scores' is float64, the protocol says FP32"):
        wire.parse_top_k(make_result(protocol.RECOMMEND, wrong_dtype), protocol.RECOMMEND)
    short = {**outputs, protocol.SCORES: np.array([1.0], dtype=np.float32)}
    with pytest.raises(GenrecError, match="2 item ids but 1 scores"):
        wire.parse_top_k(make_result(protocol.RECOMMEND, short), protocol.RECOMMEND)
    rank_outputs = {
        name: outputs[name] for name in (protocol.SCORES, protocol.NUM_UNKNOWN, protocol.NUM_TRUNCATED)
    }
    with pytest.raises(GenrecError, match="rank: 2 scores for 3 candidates"):
        wire.parse_rank(make_result(protocol.RANK, rank_outputs), np.array([1, 2, 3], dtype=np.int64))


def test_server_errors_keep_message_and_status() -> None:
    exc = InferenceServerException("k=500 exceeds the retrieval depth", status="StatusCode.INVALID_ARGUMENT")
    err = wire.error(exc, protocol.RETRIEVE, "host:8001")
    assert isinstance(err, GenrecError)
    assert (err.status, err.model) == ("INVALID_ARGUMENT", protocol.RETRIEVE)
    assert str(err) == "retrieve at host:8001: [INVALID_ARGUMENT] k=500 exceeds the retrieval depth"
    assert not wire.is_transient(err)
    assert wire.is_transient(wire.error(InferenceServerException("x", status="StatusCode.UNAVAILABLE"), None, "h"))
    # A deadline is not retried: the server may still be computing it (a retry storm under overload).
    assert not wire.is_transient(wire.error(InferenceServerException("x", status="StatusCode.DEADLINE_EXCEEDED"), None, "h"))
    assert wire.error(InferenceServerException("no status"), None, "h").status is None


def test_jitter_spreads_each_wait_over_the_upper_half_of_its_backoff() -> None:
    random.seed(0)
    for attempt in range(6):
        waits = [wire.jittered_backoff_s(attempt) for _ in range(200)]
        cap = wire.backoff_s(attempt)
        assert 0.5 * cap <= min(waits) and max(waits) < cap and max(waits) - min(waits) > 0.4 * cap


def test_server_messages_use_the_callers_argument_names() -> None:
    exc = InferenceServerException("'candidate_item_ids' holds ids the model has never seen: 7; "
                                   "history_timestamps[3]=-1 is not unix seconds", status="StatusCode.INVALID_ARGUMENT")
    err = wire.error(exc, protocol.RANK, "h:1")
    assert str(err) == "rank at h:1: [INVALID_ARGUMENT] candidates holds ids the model has never seen: 7; " \
        "timestamps[3]=-1 is not unix seconds"


def test_backoff_grows_and_is_capped() -> None:
    delays = [wire.backoff_s(attempt) for attempt in range(8)]
    assert delays[:3] == pytest.approx([0.1, 0.2, 0.4])
    assert max(delays) == 2.0 and delays == sorted(delays)
