"""The per-user K/V cache without a server: LRU within a byte budget, and the fused recommender's answers
with the cache equal to its answers without it and to the offline pipeline, for random request streams."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from genrec.builders import handlers as h
from genrec.builders.limits import Cancelled
from genrec.builders.runtimes import TorchRuntime, UserState
from genrec.builders.user_cache import RawHistory, UserCache
from genrec.client import protocol
from genrec.training.batch import SequenceBatch
from genrec.training.checkpoint import load_checkpoint, load_meta
from genrec.training.hstu import HSTU
from genrec.training.pipeline import recommend as recommend_offline
from genrec.training.pipeline import window_start

K, RETRIEVE_K, BLOCK = 5, 20, 4


def raw(n: int, seed: int = 0) -> RawHistory:
    rng = np.random.default_rng(seed)
    return RawHistory(rng.integers(1, 100, n), np.arange(n, dtype=np.int64), np.zeros(n, np.int64))


def state(nbytes: int) -> UserState:
    return UserState(cache=None, user=np.zeros(2, np.float32), nbytes=nbytes)


def test_window_starts_on_block_boundaries() -> None:
    assert [window_start(n, 10, 4) for n in (1, 10, 11, 14, 15, 18, 19)] == [0, 0, 4, 4, 8, 8, 12]
    assert [window_start(n, 10, 1) for n in (10, 11, 25)] == [0, 1, 15]  # block 1: the latest max_len
    for n in range(1, 60):
        kept = n - window_start(n, 10, 4)
        assert (7 <= kept <= 10) or n == kept


def test_lru_eviction_keeps_the_budget_and_drops_the_least_recently_used() -> None:
    history = raw(4)
    cache = UserCache(budget_bytes=3 * (1000 + history.nbytes))
    for user in (b"a", b"b", b"c"):
        cache.store(user, history, 0, 4, state(1000), appended=0)
    assert cache.lookup(b"a", history, 0).reason == "hit"  # a is now the most recently used
    cache.store(b"a", history, 0, 4, state(1000), appended=0)
    cache.store(b"d", history, 0, 4, state(1000), appended=0)
    assert cache.users() == [b"c", b"a", b"d"] and cache.stats.evictions == 1
    assert cache.bytes_in_use <= cache.budget_bytes
    cache.store(b"e", history, 0, 4, state(10**6), appended=0)  # bigger than the whole budget: not kept
    assert b"e" not in cache.users() and cache.stats.too_large == 1


def test_the_fingerprint_is_a_copy_of_the_request() -> None:
    """Served inputs are views of shared memory that later requests reuse: rewriting the stored request's
    arrays in place (as the next request would) must not make an edited history look like an extension."""
    cache = UserCache(budget_bytes=10**6)
    history = raw(6)
    cache.store(b"u", history, 0, 6, state(100), appended=0)
    history.items[2] += 1  # the buffer now holds an edited history ...
    assert cache.lookup(b"u", history, 0).reason == "edited"  # ... which is not served from the cache


def test_lookup_names_why_an_entry_cannot_be_extended() -> None:
    now = [0.0]
    cache = UserCache(budget_bytes=10**6, ttl_s=60, clock=lambda: now[0])
    history = raw(6)
    extended = RawHistory(*(np.concatenate([a, a[-1:]]) for a in (history.items, history.timestamps, history.actions)))
    edited = RawHistory(history.items.copy(), history.timestamps, history.actions)
    edited.items[2] += 1
    cases = [(history, 0, "hit"), (extended, 0, "hit"), (edited, 0, "edited"), (raw(3), 0, "edited"),
             (history, 4, "window")]
    for request, start, reason in cases:
        cache.store(b"u", history, 0, 6, state(100), appended=0)
        assert cache.lookup(b"u", request, start).reason == reason
    cache.store(b"u", history, 0, 6, state(100), appended=0)
    now[0] = 61.0
    assert cache.lookup(b"u", history, 0).reason == "expired"
    assert cache.lookup(b"u", history, 0).reason == "miss" and len(cache) == 0
    assert dict(cache.stats.invalidations) == {"edited": 2, "window": 1, "expired": 1}


@pytest.fixture(scope="module")
def served(tiny_checkpoint: Path):
    """The recommender with and without a cache, on the tiny checkpoint, and the checkpoint's model."""
    meta = load_meta(tiny_checkpoint)
    catalogue = h.Catalogue.from_meta(meta)
    model, _ = load_checkpoint(tiny_checkpoint)
    assert isinstance(model, HSTU)
    with torch.no_grad():
        table = model.item_table().numpy()
    limits = h.Limits(max_k=RETRIEVE_K)

    def recommender(cache: UserCache | None) -> h.Recommender:
        retrieval = h.ItemRetrieval(table, catalogue, limits)
        return h.Recommender(TorchRuntime(tiny_checkpoint), retrieval, catalogue, model.config.max_len, BLOCK,
                             limits, cache)

    return recommender, catalogue, model


def request(items, timestamps, ratings, *, user: bytes | None = None, candidates=None) -> h.Request:
    out = {protocol.HISTORY_ITEM_IDS: np.asarray(items, np.int64)[None],
           protocol.HISTORY_TIMESTAMPS: np.asarray(timestamps, np.int64)[None],
           protocol.HISTORY_ACTIONS: np.asarray(ratings, np.int64)[None]}
    if candidates is None:
        out |= {protocol.K: np.array([[K]], np.int32), protocol.EXCLUDE_SEEN: np.array([[True]])}
    else:
        out[protocol.CANDIDATE_ITEM_IDS] = np.asarray(candidates, np.int64)[None]
    if user is not None:
        out[protocol.USER_ID] = np.array([[user]], dtype=np.object_)
    return out


def _stream(catalogue: h.Catalogue, steps: int, seed: int):
    """Random requests of 3 interleaved users: appends of 1-5 events (some unknown ids), edits, truncations,
    repeats, and histories growing past max_len (50) so that the window moves."""
    rng = np.random.default_rng(seed)
    ids = catalogue.vocab.raw_ids
    users: dict[bytes, list[tuple[int, int, int]]] = {}
    for _ in range(steps):
        user = [b"alice", b"bob", b"carol"][rng.integers(3)]
        events = users.setdefault(user, [])
        op = rng.choice(["append"] * 6 + ["edit", "truncate", "repeat"])
        if op == "append" or not events:
            t = events[-1][1] if events else 1_600_000_000
            for _ in range(int(rng.integers(1, 6)) + (40 if not events and rng.random() < 0.5 else 0)):
                t += int(rng.integers(0, 5000))
                item = int(ids[rng.integers(len(ids))]) if rng.random() > 0.1 else -7  # -7: unknown
                events.append((item, t, int(rng.integers(0, 6))))
        elif op == "edit":
            i = int(rng.integers(len(events)))
            events[i] = (int(ids[rng.integers(len(ids))]), events[i][1], events[i][2])
        elif op == "truncate":
            del events[max(1, len(events) - int(rng.integers(1, 4))) :]  # the newest 1-3 events withdrawn
        columns = [np.array(c, np.int64) for c in zip(*events, strict=True)]
        yield user, columns, op


def test_cached_answers_equal_uncached_and_offline(served) -> None:
    recommender, catalogue, model = served
    cached, fresh = recommender(UserCache(budget_bytes=64 * 2**20)), recommender(None)
    ops: dict[str, int] = {}
    for user, (items, timestamps, ratings), op in _stream(catalogue, steps=120, seed=0):
        with_cache = cached.execute([request(items, timestamps, ratings, user=user)])[0]
        without = fresh.execute([request(items, timestamps, ratings)])[0]
        assert not isinstance(with_cache, Exception) and not isinstance(without, Exception)
        assert with_cache[protocol.ITEM_IDS].tolist() == without[protocol.ITEM_IDS].tolist()
        np.testing.assert_allclose(with_cache[protocol.SCORES], without[protocol.SCORES], rtol=1e-5, atol=1e-5)
        ops[op] = ops.get(op, 0) + int(with_cache[protocol.CACHED_EVENTS][0, 0] > 0)

        dense, known = catalogue.vocab.to_dense(items)
        window = np.flatnonzero(known)[window_start(int(known.sum()), model.config.max_len, BLOCK):]
        batch = SequenceBatch.from_lists([dense[window].tolist()], [timestamps[window].tolist()],
                                         [catalogue.actions(ratings[window]).tolist()])
        ids, scores = recommend_offline(model, batch, K, RETRIEVE_K, seen=torch.from_numpy(dense[None]))
        assert with_cache[protocol.ITEM_IDS][0].tolist() == catalogue.vocab.to_raw(ids[0].numpy()).tolist()
        np.testing.assert_allclose(with_cache[protocol.SCORES][0], scores[0].numpy(), rtol=1e-5, atol=1e-5)
    stats = cached.cache.stats
    assert stats.hits > 40 and stats.events_appended > 100
    assert stats.invalidations["edited"] > 0 and stats.invalidations["window"] > 0
    assert ops["append"] > 0 and ops.get("edit", 0) == 0  # an edit is never served from the cache


def test_returning_users_extended_together_answer_as_one_by_one(served) -> None:
    """The stream's requests in batches of 4 (some naming one user twice): returning users of a batch are
    extended in one pass, and every answer equals the uncached one."""
    recommender, catalogue, _ = served
    cached, fresh = recommender(UserCache(budget_bytes=64 * 2**20)), recommender(None)
    together: list[int] = []
    extend_states = cached.runtime.extend_states
    cached.runtime.extend_states = lambda states, events: together.append(len(states)) or extend_states(states, events)
    steps = list(_stream(catalogue, steps=120, seed=1))
    for start in range(0, len(steps), 4):
        batch = steps[start : start + 4]
        with_cache = cached.execute([request(*columns, user=user) for user, columns, _ in batch])
        without = fresh.execute([request(*columns) for _, columns, _ in batch])
        for got, want in zip(with_cache, without, strict=True):
            assert not isinstance(got, Exception) and not isinstance(want, Exception)
            assert got[protocol.ITEM_IDS].tolist() == want[protocol.ITEM_IDS].tolist()
            np.testing.assert_allclose(got[protocol.SCORES], want[protocol.SCORES], rtol=1e-5, atol=1e-5)
    assert max(together) >= 2 and cached.cache.stats.hits > 30


def test_users_computed_from_scratch_share_a_pass_and_answer_as_alone(served) -> None:
    """Anonymous users and cache misses of one batch are prefilled together, in groups of similar length; each
    answer equals its request served alone, and the cache keeps each user's own K/V (its next visit extends it)."""
    recommender, catalogue, _ = served
    model = recommender(UserCache(budget_bytes=64 * 2**20))
    passes: list[int] = []
    encode_states = model.runtime.encode_states
    model.runtime.encode_states = lambda events: passes.append(len(events)) or encode_states(events)
    rng = np.random.default_rng(3)
    ids = catalogue.vocab.raw_ids
    histories = [(ids[rng.integers(len(ids), size=n)], np.cumsum(rng.integers(0, 5000, size=n)) + 10**9,
                  rng.integers(1, 6, size=n)) for n in (30, 33, 35, 4, 5, 40)]
    batch = [request(*hist, user=None if u % 2 else f"new-{u}".encode()) for u, hist in enumerate(histories)]
    together = model.execute(batch)
    assert max(passes) >= 3 and sum(passes) == len(batch)
    alone = recommender(None)
    for got, r in zip(together, batch, strict=True):
        (want,) = alone.execute([r])
        assert not isinstance(got, Exception) and not isinstance(want, Exception)
        assert got[protocol.ITEM_IDS].tolist() == want[protocol.ITEM_IDS].tolist()
        np.testing.assert_allclose(got[protocol.SCORES], want[protocol.SCORES], rtol=1e-5, atol=1e-5)
    items, timestamps, actions = histories[0]
    more = (np.append(items, ids[0]), np.append(timestamps, timestamps[-1] + 1), np.append(actions, 2))
    (again,) = model.execute([request(*more, user=b"new-0")])
    (want,) = alone.execute([request(*more)])
    assert not isinstance(again, Exception) and not isinstance(want, Exception)
    assert again[protocol.CACHED_EVENTS][0, 0] == len(items)
    np.testing.assert_allclose(again[protocol.SCORES], want[protocol.SCORES], rtol=1e-5, atol=1e-5)


def test_a_mixed_batch_with_one_user_twice_and_a_bad_request(served) -> None:
    recommender, catalogue, _ = served
    cached, fresh = recommender(UserCache(budget_bytes=64 * 2**20)), recommender(None)
    ids = catalogue.vocab.raw_ids
    long, short = (ids[:30], np.arange(30) + 10**9, np.ones(30)), (ids[5:8], np.arange(3) + 10**9, np.ones(3))
    longer = tuple(np.concatenate([a, b]) for a, b in zip(long, (ids[40:42], [2 * 10**9] * 2, [3, 3]), strict=True))
    batch = [
        request(*long, user=b"u"),
        request(*short, user=b"v", candidates=ids[:4]),
        request(*longer, user=b"u"),  # the same user again, extended, in the same batch
        request(*short, candidates=[10**12]),  # unknown candidate: this request fails alone
    ]
    results = cached.execute(batch)
    assert isinstance(results[3], h.RequestError) and "never seen" in str(results[3])
    assert results[2][protocol.CACHED_EVENTS][0, 0] == 30
    for got, want in zip(results[:3], fresh.execute(batch[:3]), strict=True):
        assert not isinstance(got, Exception) and not isinstance(want, Exception)
        np.testing.assert_allclose(got[protocol.SCORES], want[protocol.SCORES], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("user", "message"),
    [(np.array([[b""]], dtype=np.object_), "1 to 256 bytes"), (np.array([[b"x" * 257]], dtype=np.object_), "bytes"),
     (np.array([[b"a", b"b"]], dtype=np.object_), r"shape \[1, 1\]")],
)
def test_bad_user_ids_are_refused(served, user: np.ndarray, message: str) -> None:
    recommender, catalogue, _ = served
    bad = {**request(catalogue.vocab.raw_ids[:3], [1, 2, 3], [0, 0, 0]), protocol.USER_ID: user}
    (result,) = recommender(UserCache(budget_bytes=2**20)).execute([bad])
    assert isinstance(result, h.RequestError) and re.search(message, str(result))


def test_users_are_scored_together_only_with_similar_lengths_and_candidate_counts() -> None:
    groups = h._similar([7, 8, 9, 10], lengths=[10, 10, 12, 500], counts=[100, 2000, 100, 100])
    assert sorted(sorted(g) for g in groups) == [[7, 9], [8], [10]]  # a maximal rank pads no recommend


def test_a_caller_who_goes_away_stops_being_scored_between_chunks(served) -> None:
    """Triton's is_cancelled is asked between chunks of candidates: a maximal rank whose caller cancelled
    is not scored to the end, and the other request of its batch is answered as usual."""
    recommender, catalogue, _ = served
    model = recommender(None)
    model.chunk = 16
    ids = catalogue.vocab.raw_ids
    calls = {"left": 0, "stays": 0}

    def asked(name: str, answer_after: int):  # noqa: ANN202
        def gone() -> bool:
            calls[name] += 1
            return calls[name] > answer_after
        return gone

    history = (ids[:20], np.arange(20) + 10**9, np.ones(20))
    batch = [request(*history, candidates=np.resize(ids, 100)), request(*history, candidates=np.resize(ids, 100))]
    scored_chunks = []
    score_states = model.runtime.score_states
    model.runtime.score_states = lambda states, cands: scored_chunks.append(len(states)) or score_states(states, cands)
    left, stays = model.execute(batch, [asked("left", 1), asked("stays", 10**6)])
    model.runtime.score_states = score_states
    assert isinstance(left, Cancelled) and isinstance(stays, dict) and stays[protocol.SCORES].shape == (1, 100)
    assert calls == {"left": 2, "stays": 6} and scored_chunks == [2, 2, 1, 1, 1, 1, 1]  # 7 chunks of 16
    (alone,) = model.execute(batch[1:])
    np.testing.assert_allclose(stays[protocol.SCORES], alone[protocol.SCORES], rtol=1e-5, atol=1e-5)
