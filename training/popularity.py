"""Recent popularity: how often each item was chosen, by anyone, in the days before a request.

A user's history cannot show what everyone is watching this week, and neither can the retrieval score
<user, item>; on MovieLens the time-ordered test events follow it strongly. The candidate scorer reads it as
input features, so the ranking stage knows something retrieval does not.

Counts come from a cumulative table over fixed-width time buckets, held as a buffer so the checkpoint carries
it and the exported scorer needs only a gather. A request in bucket b sees events before bucket b's start:
never the request's own event nor anything later. A request after the log's end sees the counts at its end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

DAY = 86_400


@dataclass(frozen=True)
class PopularityConfig:
    enabled: bool = True
    windows: tuple[int, ...] = (DAY, 7 * DAY, 30 * DAY)  # seconds; the all-time count is always a feature too
    min_bucket_seconds: int = 3_600
    max_entries: int = 8_000_000  # buckets x items of the table (float32): coarser buckets on long logs


@dataclass(frozen=True)
class PopularityTable:
    cumulative: np.ndarray  # (buckets + 1, N + 1) float32: events of each item before each bucket's start
    origin: int  # unix seconds where bucket 0 starts
    bucket_seconds: int

    @property
    def num_buckets(self) -> int:
        return self.cumulative.shape[0] - 1


def popularity_table(timestamps: np.ndarray, items: np.ndarray, num_items: int, config: PopularityConfig) -> PopularityTable:
    """The cumulative counts of a log: (E,) unix seconds and (E,) dense item ids in 1..num_items."""
    if len(timestamps) == 0:
        return PopularityTable(np.zeros((2, num_items + 1), np.float32), 0, config.min_bucket_seconds)
    origin = int(timestamps.min())
    span = int(timestamps.max()) - origin + 1
    max_buckets = max(1, config.max_entries // (num_items + 1) - 1)
    width = max(config.min_bucket_seconds, math.ceil(span / max_buckets))
    buckets = (np.asarray(timestamps, np.int64) - origin) // width
    counts = np.zeros((math.ceil(span / width) + 1, num_items + 1), np.float32)
    np.add.at(counts, (buckets + 1, np.asarray(items, np.int64)), 1.0)
    return PopularityTable(np.cumsum(counts, axis=0, dtype=np.float32), origin, width)


class RecentPopularity(nn.Module):
    """(B, C) candidates, (B,) request times -> (B, C, len(windows) + 1) features log(1 + count)."""

    cumulative: Tensor
    origin: Tensor
    bucket_seconds: Tensor
    window_seconds: Tensor

    def __init__(self, num_buckets: int, num_items: int, windows: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("cumulative", torch.zeros(num_buckets + 1, num_items + 1))
        self.register_buffer("origin", torch.zeros((), dtype=torch.long))
        self.register_buffer("bucket_seconds", torch.ones((), dtype=torch.long))
        self.register_buffer("window_seconds", torch.tensor(windows, dtype=torch.long))

    @property
    def num_features(self) -> int:
        return self.window_seconds.numel() + 1

    def set_table(self, table: PopularityTable) -> None:
        if tuple(table.cumulative.shape) != tuple(self.cumulative.shape):
            raise ValueError(f"popularity table {table.cumulative.shape} != the model's {tuple(self.cumulative.shape)}")
        self.cumulative.copy_(torch.from_numpy(table.cumulative))
        self.origin.fill_(table.origin)
        self.bucket_seconds.fill_(table.bucket_seconds)

    def forward(self, items: Tensor, request_time: Tensor) -> Tensor:
        last = self.cumulative.shape[0] - 1
        bucket = torch.div(request_time - self.origin, self.bucket_seconds, rounding_mode="floor").clamp(0, last)
        lag = torch.div(self.window_seconds, self.bucket_seconds, rounding_mode="floor").clamp(min=1)  # (W,)
        starts = torch.cat([(bucket[:, None] - lag[None, :]).clamp(min=0), torch.zeros_like(bucket)[:, None]], 1)
        flat = self.cumulative.flatten()
        stride = self.cumulative.shape[1]
        now = flat[bucket[:, None] * stride + items]  # (B, C): everything before the request's bucket
        before = flat[starts[:, None, :] * stride + items[..., None]]  # (B, C, W + 1)
        return torch.log(1.0 + (now[..., None] - before))
