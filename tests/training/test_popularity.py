"""Recent popularity features: counts against a brute-force count over the log, and never a future event."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genrec.training.popularity import DAY, PopularityConfig, RecentPopularity, popularity_table

NUM_ITEMS = 12
WINDOWS = (DAY, 7 * DAY)


def random_log(seed: int, events: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    timestamps = 1_600_000_000 + rng.integers(0, 40 * DAY, events)
    items = rng.integers(1, NUM_ITEMS + 1, events)
    return timestamps, items


def fitted(timestamps: np.ndarray, items: np.ndarray, config: PopularityConfig) -> RecentPopularity:
    table = popularity_table(timestamps, items, NUM_ITEMS, config)
    module = RecentPopularity(table.num_buckets, NUM_ITEMS, config.windows)
    module.set_table(table)
    return module


@pytest.mark.parametrize("max_entries", [10**6, 40 * (NUM_ITEMS + 1)], ids=["hourly", "coarse"])
def test_counts_equal_a_brute_force_count_before_the_request_bucket(max_entries: int) -> None:
    timestamps, items = random_log(0)
    config = PopularityConfig(windows=WINDOWS, max_entries=max_entries)
    table = popularity_table(timestamps, items, NUM_ITEMS, config)
    if max_entries == 10**6:
        assert table.bucket_seconds == 3_600
    else:  # 40 days in at most 39 buckets
        assert DAY < table.bucket_seconds < 2 * DAY and table.num_buckets <= 40
    module = fitted(timestamps, items, config)
    rng = np.random.default_rng(1)
    # requests before, inside and after the log
    request = np.concatenate([[timestamps.min() - 5, timestamps.max() + 100 * DAY], rng.choice(timestamps, 30)])
    candidates = rng.integers(1, NUM_ITEMS + 1, (len(request), 5))
    got = torch.exp(module(torch.from_numpy(candidates), torch.from_numpy(request))) - 1
    width, origin = table.bucket_seconds, table.origin
    for r, t in enumerate(request):
        bucket = min(max((t - origin) // width, 0), table.num_buckets)
        end = origin + bucket * width
        for c, item in enumerate(candidates[r]):
            mine = timestamps[items == item]
            lags = [max(1, w // width) for w in WINDOWS]
            expected = [np.sum((mine < end) & (mine >= end - lag * width)) for lag in lags] + [np.sum(mine < end)]
            np.testing.assert_allclose(got[r, c].numpy(), expected, atol=1e-3)
    assert float(got[0].abs().max()) < 1e-4  # before the log: nothing
    assert float(got[1, :, -1].min()) > 0  # after it: the counts at its end


def test_the_request_and_later_events_are_never_counted() -> None:
    timestamps, items = random_log(2)
    module = fitted(timestamps, items, PopularityConfig(windows=WINDOWS))
    request = torch.tensor([1_600_000_000 + 20 * DAY + 7_000])
    everything = torch.arange(1, NUM_ITEMS + 1)[None]
    before = module(everything, request)
    # the same log plus a burst of events on item 1 at and after the request time
    burst = np.full(50, int(request[0]))
    later = fitted(np.concatenate([timestamps, burst, burst + DAY]), np.concatenate([items, np.ones(100, np.int64)]),
                   PopularityConfig(windows=WINDOWS))
    torch.testing.assert_close(later(everything, request), before)
    # ...while the same burst an hour earlier is counted
    earlier = fitted(np.concatenate([timestamps, burst - 3_600]), np.concatenate([items, np.ones(50, np.int64)]),
                     PopularityConfig(windows=WINDOWS))
    assert float(earlier(everything, request)[0, 0, 0]) > float(before[0, 0, 0])


def test_the_served_score_reads_the_popularity_at_the_request_time() -> None:
    from genrec.training.batch import SequenceBatch
    from genrec.training.hstu import HSTU, HSTUConfig

    timestamps, items = random_log(3)
    config = PopularityConfig(windows=WINDOWS)
    table = popularity_table(timestamps, items, NUM_ITEMS, config)
    torch.manual_seed(0)
    model = HSTU(HSTUConfig(num_items=NUM_ITEMS, d_model=8, num_layers=1, d_qk=8, d_v=8, max_len=10,
                            popularity_windows=WINDOWS, popularity_buckets=table.num_buckets))
    assert model.popularity is not None
    model.popularity.set_table(table)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.eval()
    batch = SequenceBatch.from_lists([[1, 2, 3]], [[1_600_000_000 + k * DAY for k in (1, 2, 3)]], [[0, 0, 0]])
    candidates = torch.arange(1, NUM_ITEMS + 1)[None]
    with torch.no_grad():
        cache, user = model.prefill(batch)
        default = model.score_candidates(cache, user, candidates)[..., 0]
        at_last_event = model.score_candidates(cache, user, candidates, torch.tensor([1_600_000_000 + 3 * DAY]))
        a_month_later = model.score_candidates(cache, user, candidates, torch.tensor([1_600_000_000 + 33 * DAY]))
        model.popularity.cumulative.zero_()
        unpopular = model.score_candidates(cache, user, candidates)[..., 0]
    torch.testing.assert_close(default, at_last_event[..., 0])  # the request time defaults to the last event's
    assert float((default - unpopular).abs().max()) > 1e-2
    assert float((at_last_event - a_month_later)[..., 0].abs().max()) > 1e-2
