"""The per-user K/V cache through real tritonserver processes: cached == uncached == offline, edits
detected, the byte budget read from the metrics port, LRU eviction, and two replicas behind the multi-URL
client keeping each user on one replica and failing over when it stops."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from server_constants import RETRIEVE_K, WINDOW_BLOCK
from triton_stats import inferences, settled, steady

from genrec.builders.build import BuildConfig, build_repository
from genrec.builders.requests import Catalogue
from genrec.builders.runtimes import TorchRuntime
from genrec.builders.tritonserver import ServerConfig, TritonServer, free_ports
from genrec.client import RecommendClient, wire
from genrec.training.batch import SequenceBatch
from genrec.training.checkpoint import load_checkpoint
from genrec.training.hstu import HSTU
from genrec.training.pipeline import recommend as recommend_offline
from genrec.training.pipeline import window_start

pytestmark = pytest.mark.server

EVENTS = 20  # each LRU test user's history
USERS_IN_BUDGET = 3.5  # the budget holds three of them, not four


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> HSTU:
    loaded, _ = load_checkpoint(tiny_checkpoint)
    assert isinstance(loaded, HSTU)
    return loaded


@pytest.fixture(scope="module")
def item_ids(tiny_checkpoint: Path) -> np.ndarray:
    _, meta = load_checkpoint(tiny_checkpoint)
    return meta.item_raw_ids.astype(np.int64)


def _entry_bytes(tiny_checkpoint: Path, item_ids: np.ndarray) -> int:
    """What one freshly computed user of EVENTS events holds: its K/V plus the raw history (24 B an event)."""
    runtime = TorchRuntime(tiny_checkpoint)
    zeros = np.zeros(EVENTS, np.int64)
    return runtime.encode_states([(np.arange(1, EVENTS + 1), zeros, zeros)])[0].nbytes + 24 * EVENTS


@pytest.fixture(scope="module")
def replicas(tiny_checkpoint: Path, item_ids: np.ndarray, tmp_path_factory) -> Iterator[list[TritonServer]]:
    """Two servers of one repository whose user cache holds 3.5 users of EVENTS events."""
    repository = tmp_path_factory.mktemp("repo_cache")
    budget_mb = USERS_IN_BUDGET * _entry_bytes(tiny_checkpoint, item_ids) / 2**20
    build_repository(BuildConfig(checkpoint=tiny_checkpoint, repository=repository, retrieve_k=RETRIEVE_K,
                                 window_block=WINDOW_BLOCK, user_cache_mb=budget_mb))
    servers = []
    try:
        for _ in range(2):
            grpc, http, metrics = free_ports(3)
            servers.append(TritonServer(ServerConfig(repository, grpc_port=grpc, http_port=http, metrics_port=metrics)))
            servers[-1].start()
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def _metric(server: TritonServer, name: str, until: Callable[[float], bool] | None = None) -> float:
    value = server.metric(f'{name}{{model="recommender"}}', until)
    assert value == value, f"{name} not on the metrics port"  # nan if absent
    return value


def _history(item_ids: np.ndarray, n: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    rng = np.random.default_rng(seed)
    items = item_ids[rng.integers(len(item_ids), size=n)].tolist()
    timestamps = np.cumsum(rng.integers(0, 4000, size=n)) + 1_600_000_000
    return items, timestamps.tolist(), rng.integers(0, 6, size=n).tolist()


@pytest.mark.parametrize("server", ["torch"], indirect=True)  # the shared server, built with the default cache
def test_cached_equals_uncached_equals_offline_with_appends_edits_and_a_moving_window(
    server: TritonServer, model: HSTU, tiny_checkpoint: Path, item_ids: np.ndarray
) -> None:
    _, meta = load_checkpoint(tiny_checkpoint)
    catalogue = Catalogue.from_meta(meta)  # the served id and action mappings
    rng = np.random.default_rng(1)
    users = {f"user-{u}": _history(item_ids, int(rng.integers(1, 45)), seed=u) for u in range(3)}
    hits = edits = 0
    with RecommendClient(server.url, timeout_s=60) as client:
        for step in range(36):
            name = f"user-{step % 3}"  # three users interleaved
            items, timestamps, actions = users[name]
            if step % 9 == 8:  # an edit of an old event: must be recomputed, not served from the cache
                items[0] = int(item_ids[(item_ids.tolist().index(items[0]) + 1) % len(item_ids)])
            else:
                more = _history(item_ids, int(rng.integers(1, 6)), seed=100 + step)
                items += more[0]
                timestamps += [timestamps[-1] + t - more[1][0] for t in more[1]]
                actions += more[2]
            cached = client.recommend(items, k=5, timestamps=timestamps, actions=actions, user_id=name)
            fresh = client.recommend(items, k=5, timestamps=timestamps, actions=actions)
            assert fresh.cached_events == 0
            assert cached.item_ids.tolist() == fresh.item_ids.tolist()
            np.testing.assert_allclose(cached.scores, fresh.scores, rtol=1e-5, atol=1e-5)
            if step % 9 == 8:
                assert cached.cached_events == 0
                edits += 1
            hits += cached.cached_events > 0

            dense = catalogue.vocab.to_dense(np.array(items))[0].tolist()
            start = window_start(len(dense), model.config.max_len, WINDOW_BLOCK)
            batch = SequenceBatch.from_lists([dense[start:]], [timestamps[start:]],
                                             [catalogue.actions(np.array(actions[start:])).tolist()])
            ids, scores = recommend_offline(model, batch, 5, RETRIEVE_K, seen=torch.tensor([dense]))
            assert cached.item_ids.tolist() == meta.item_raw_ids[ids[0].numpy() - 1].tolist()
            np.testing.assert_allclose(cached.scores, scores[0].numpy(), rtol=1e-5, atol=1e-5)

            ranked = client.rank(items, item_ids[:7], timestamps=timestamps, actions=actions, user_id=name)
            assert ranked.cached_events == len(dense) - start  # rank reuses what recommend just cached
            np.testing.assert_allclose(
                ranked.scores, client.rank(items, item_ids[:7], timestamps=timestamps, actions=actions).scores,
                rtol=1e-5, atol=1e-5)
        assert max(len(u[0]) for u in users.values()) > model.config.max_len  # some windows moved
    assert hits >= 20 and edits == 4
    assert _metric(server, "genrec_user_cache_hits_total", lambda v: v >= hits) >= hits


def test_the_budget_holds_and_eviction_is_least_recently_used(
    replicas: list[TritonServer], item_ids: np.ndarray
) -> None:
    server = replicas[1]
    budget = _metric(server, "genrec_user_cache_budget_bytes")
    histories = {u: _history(item_ids, EVENTS, seed=50 + u) for u in range(5)}

    def call(client: RecommendClient, user: int) -> int:
        items, timestamps, actions = histories[user]
        recs = client.recommend(items, k=3, timestamps=timestamps, actions=actions, user_id=f"lru-{user}")
        assert _metric(server, "genrec_user_cache_bytes") <= budget
        return recs.cached_events

    with RecommendClient(server.url, timeout_s=60) as client:
        evictions = _metric(server, "genrec_user_cache_evictions_total")
        assert [call(client, u) for u in (0, 1, 2)] == [0, 0, 0]
        assert _metric(server, "genrec_user_cache_users", lambda v: v == 3) == 3
        assert call(client, 0) == EVENTS  # a hit: user 0 is now the most recently used
        assert call(client, 3) == 0  # a fourth user does not fit: user 1, the least recently used, goes
        assert _metric(server, "genrec_user_cache_evictions_total", lambda v: v > evictions) == evictions + 1
        assert call(client, 0) == EVENTS and call(client, 2) == EVENTS and call(client, 3) == EVENTS
        assert call(client, 1) == 0  # evicted
        assert _metric(server, "genrec_user_cache_users", lambda v: v == 3) == 3


def test_two_replicas_keep_each_user_on_one_and_fail_over_without_stale_state(
    replicas: list[TritonServer], item_ids: np.ndarray
) -> None:
    urls = [s.url for s in replicas]
    users = [f"routed-{u}" for u in range(8)]
    home = {u: wire.Router(urls).order(u)[0] for u in users}
    assert len(set(home.values())) == 2  # the users spread over both replicas
    with RecommendClient(urls, timeout_s=60, retries=1) as client:
        for seed, user in enumerate(users):
            items, timestamps, actions = _history(item_ids, 10, seed=seed)
            before = steady(lambda: [inferences(s.url, "recommender") for s in replicas])
            for n in (8, 9, 10):  # the same user three times, one more event each time
                recs = client.recommend(items[:n], k=3, timestamps=timestamps[:n], actions=actions[:n], user_id=user)
                assert recs.cached_events == (0 if n == 8 else n - 1)  # each time on the replica holding it
            after = settled(lambda: [inferences(s.url, "recommender") for s in replicas],
                            lambda now: now[home[user]] - before[home[user]] >= 3)  # noqa: B023 (called here)
            assert after[home[user]] - before[home[user]] == 3 and after[1 - home[user]] == before[1 - home[user]]

        user = next(u for u in users if home[u] == 0)
        items, timestamps, actions = _history(item_ids, 12, seed=99)
        replicas[0].stop()  # the user's replica goes away: its calls go to the other one, computed afresh
        moved = client.recommend(items, k=3, timestamps=timestamps, actions=actions, user_id=user)
        assert moved.cached_events == 0
        with RecommendClient(urls[1], timeout_s=60) as only:
            expected = only.recommend(items, k=3, timestamps=timestamps, actions=actions)
        assert moved.item_ids.tolist() == expected.item_ids.tolist()
        again = client.recommend(items + items[:1], k=3, timestamps=timestamps + timestamps[-1:],
                                 actions=actions + actions[:1], user_id=user)
        assert again.cached_events == 12  # now cached on the replica that took over
