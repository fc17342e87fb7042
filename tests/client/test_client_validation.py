"""Bad input is refused client-side, before anything is sent, with a message naming the field."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from genrec.client import GenrecError, RecommendClient
from genrec.client import validate as v

# Nothing listens here: a request that got past validation would fail with UNAVAILABLE instead.
NOWHERE = "127.0.0.1:1"


@pytest.fixture(scope="module")
def client() -> RecommendClient:
    return RecommendClient(NOWHERE, timeout_s=1.0, retries=0)


BAD_HISTORIES: list[tuple[Any, str]] = [
    ([], "user_seq is empty"),
    (np.array([], dtype=np.int64), "user_seq is empty"),
    ([1.5, 2.0], "user_seq must be integers, got dtype float64"),
    ([1, 2.5], "user_seq must be integers"),
    (["1", "2"], "user_seq must be integers"),
    ([True, False], "user_seq must be integers, got dtype bool"),
    ([[1, 2], [3, 4]], "user_seq must be 1-D, got shape (2, 2)"),
    ([[1, 2], [3]], "user_seq must be a 1-D sequence"),
    (7, "user_seq must be 1-D, got shape ()"),
    ("1,2,3", "user_seq must be a 1-D sequence of numbers"),
    (None, "user_seq must be a 1-D sequence of numbers"),
    ({3, 1, 2}, "user_seq must be an ordered sequence (list, tuple, numpy array), got a set"),
    ({1: 2}, "user_seq must be an ordered sequence (list, tuple, numpy array), got a dict"),
    ([1, 2**63], "user_seq[1]=9223372036854775808 is outside the int64 range"),
    (np.array([1, 2**63], dtype=np.uint64), "user_seq[1]=9223372036854775808 is outside the int64 range"),
]


@pytest.mark.parametrize(("user_seq", "message"), BAD_HISTORIES)
def test_bad_history(client: RecommendClient, user_seq: Any, message: str) -> None:
    for call in (client.recommend, client.retrieve):
        with pytest.raises(GenrecError, match="^" + _re(message)) as info:
            call(user_seq)
        assert info.value.status == "INVALID_ARGUMENT"
    with pytest.raises(GenrecError, match="^" + _re(message)):
        client.rank(user_seq, [1, 2])


BAD_TIMESTAMPS: list[tuple[Any, str]] = [
    ([1, 2], "timestamps has 2 values but the history has 3 items"),
    ([1.0, float("nan"), 3.0], "timestamps[1]=nan is not a whole number of seconds"),
    ([1.0, 2.0, float("inf")], "timestamps[2]=inf is not a whole number of seconds"),
    ([1.0, 2.5, 3.0], "timestamps[1]=2.5 is not a whole number of seconds"),  # nothing is rounded away
    ([1.0, 2.0, 1e30], "timestamps[2]=4102444800 is not unix seconds in [0, 4102444800)"),
    ([1, 2, 1_700_000_000_000], "timestamps[2]=1700000000000 is not unix seconds in [0, 4102444800)"),
    ([-5, 2, 3], "timestamps[0]=-5 is not unix seconds"),
    (["a", "b", "c"], "timestamps must be integers"),
    (
        [10, 9, 11],
        "timestamps must be non-decreasing (oldest event first): timestamps[1]=9 < timestamps[0]=10",
    ),
    ([[1, 2, 3]], "timestamps must be 1-D"),
]


@pytest.mark.parametrize(("timestamps", "message"), BAD_TIMESTAMPS)
def test_bad_timestamps(client: RecommendClient, timestamps: Any, message: str) -> None:
    with pytest.raises(GenrecError, match="^" + _re(message)):
        client.recommend([1, 2, 3], timestamps=timestamps)
    with pytest.raises(GenrecError, match="^" + _re(message)):
        client.rank([1, 2, 3], [4], timestamps=timestamps)


BAD_ACTIONS: list[tuple[Any, str]] = [
    ([0, 1], "actions has 2 values but the history has 3 items"),
    ([0, -1, 2], "actions[1]=-1 is negative"),
    ([0.5, 1.0, 2.0], "actions must be integers"),
]


@pytest.mark.parametrize(("actions", "message"), BAD_ACTIONS)
def test_bad_actions(client: RecommendClient, actions: Any, message: str) -> None:
    with pytest.raises(GenrecError, match="^" + _re(message)):
        client.retrieve([1, 2, 3], actions=actions)


@pytest.mark.parametrize("k", [0, -3, 2.0, True, "5", None, 2**31])
def test_bad_k(client: RecommendClient, k: Any) -> None:
    with pytest.raises(GenrecError, match="^k must be a positive integer") as info:
        client.recommend([1, 2, 3], k=k)
    assert info.value.status == "INVALID_ARGUMENT"


def test_bad_exclude_seen(client: RecommendClient) -> None:
    with pytest.raises(GenrecError, match="^exclude_seen must be True or False, got 'yes'"):
        client.recommend([1], exclude_seen="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("candidates", "message"),
    [([], "candidates is empty"), ([1.5], "candidates must be integers"), ([[1]], "candidates must be 1-D")],
)
def test_bad_candidates(client: RecommendClient, candidates: Any, message: str) -> None:
    with pytest.raises(GenrecError, match="^" + _re(message)):
        client.rank([1, 2], candidates)


def test_bad_batches_name_the_user(client: RecommendClient) -> None:
    with pytest.raises(GenrecError, match=r"^user_seqs is empty"):
        client.recommend_batch([])
    with pytest.raises(GenrecError, match=r"^user_seqs\[1\] is empty"):
        client.recommend_batch([[1, 2], []])
    with pytest.raises(GenrecError, match=r"^timestamps has 1 entries but there are 2 users"):
        client.retrieve_batch([[1], [2]], timestamps=[[5]])
    with pytest.raises(GenrecError, match=r"^timestamps\[1\]\[0\]=nan is not a whole number"):
        client.recommend_batch([[1], [2]], timestamps=[None, [float("nan")]])
    with pytest.raises(GenrecError, match=r"^actions\[0\]\[0\]=-2 is negative"):
        client.recommend_batch([[1], [2]], actions=[[-2], None])
    with pytest.raises(GenrecError, match=r"^candidates has 1 entries but there are 2 users"):
        client.rank_batch([[1], [2]], [[3]])
    with pytest.raises(GenrecError, match=r"^candidates\[1\] is empty"):
        client.rank_batch([[1], [2]], [[3], []])
    with pytest.raises(GenrecError, match=r"^k must be a positive integer"):
        client.recommend_batch([[1], [2]], k=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timeout_s": 0}, "timeout_s must be a positive number"),
        ({"timeout_s": float("nan")}, "timeout_s must be a positive number"),
        ({"retries": -1}, "retries must be an integer >= 0"),
        ({"concurrency": 0}, "concurrency must be an integer >= 1"),
    ],
)
def test_bad_settings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(GenrecError, match="^" + _re(message)):
        RecommendClient(NOWHERE, **kwargs)


@pytest.mark.parametrize("url", [None, "", "  ", 8001])
def test_a_client_needs_a_url(url: Any) -> None:
    with pytest.raises(GenrecError, match=r"^url must be 'host:port'") as info:
        RecommendClient(url)
    assert info.value.status == "INVALID_ARGUMENT"


def test_a_generator_is_read_in_order() -> None:
    history = v.history((i for i in (5, 3, 9)), iter([10, 20, 30]), None, now=0)
    assert history.item_ids.tolist() == [5, 3, 9] and history.timestamps.tolist() == [10, 20, 30]


def test_good_input_becomes_the_wire_arrays() -> None:
    history = v.history(np.array([3, 1, 2], dtype=np.uint32), [100.0, 101.0, 200], [0, 5, 1], now=7)
    np.testing.assert_array_equal(history.item_ids, [3, 1, 2])
    np.testing.assert_array_equal(history.timestamps, [100, 101, 200])  # whole seconds as floats, e.g. pandas
    np.testing.assert_array_equal(history.actions, [0, 5, 1])
    for array in (history.item_ids, history.timestamps, history.actions):
        assert array.dtype == np.int64 and array.shape == (3,)
    assert v.k(np.int64(5)) == 5


def test_defaults_are_now_and_unknown_actions() -> None:
    history = v.history((10, 20), None, None, now=1_700_000_000)
    np.testing.assert_array_equal(history.timestamps, [1_700_000_000, 1_700_000_000])  # zero time gaps
    np.testing.assert_array_equal(history.actions, [0, 0])


def test_equal_timestamps_are_allowed() -> None:
    np.testing.assert_array_equal(v.timestamps([5, 5, 6], 3, "timestamps"), [5, 5, 6])


def _re(text: str) -> str:
    return re.escape(text)
