"""Triton's per-model statistics, read the way tests must read them.

Triton counts a request just after it has sent the response (for an ensemble's steps as for the ensemble), so a
count read the moment a call returns can still miss that call: `settled` polls for a count after calls, `steady`
for the count before them (an earlier call still being counted would otherwise land in the difference).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import tritonclient.grpc as grpcclient

T = TypeVar("T")


def model_stats(url: str, model: str) -> dict:
    with grpcclient.InferenceServerClient(url) as raw:
        return raw.get_inference_statistics(model, as_json=True)["model_stats"][0]


def inferences(url: str, model: str) -> int:
    """How many requests reached `model`."""
    return int(model_stats(url, model).get("inference_count", 0))


def settled(read: Callable[[], T], done: Callable[[T], bool], settle_s: float = 0.3) -> T:
    """`read()` once the statistics have caught up: polls until `done` holds (5 s at most), then waits `settle_s`
    more so that a count still moving (one request too many) shows."""
    deadline = time.monotonic() + 5
    while not done(read()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(settle_s)
    return read()


def steady(read: Callable[[], T], settle_s: float = 0.3) -> T:
    """`read()` once two reads `settle_s` apart agree (5 s at most): the baseline of a count that calls made just
    before may still be moving."""
    deadline = time.monotonic() + 5
    last = read()
    while True:
        time.sleep(settle_s)
        now = read()
        if now == last or time.monotonic() > deadline:
            return now
        last = now
