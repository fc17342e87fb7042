"""Smoke test of the serving benchmark's perf_analyzer part: a real server, two short measurements, the CSV."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from genrec.benchmarks.perf_analyzer import Target, parse_perf_csv, sweep
from genrec.benchmarks.servers import SMALL_TORCH, build, running_servers, warm_up
from genrec.benchmarks.serving_config import ServingBenchConfig
from genrec.benchmarks.serving_data import History, recommend_entry, write_input_data
from genrec.training.prepare import DataConfig, prepare

pytestmark = pytest.mark.server


def _histories(data_config: DataConfig, count: int) -> list[History]:
    data, _, _ = prepare(data_config)
    ratings_of = np.concatenate([[0.0], data.action_values])
    out = []
    for row in range(count):
        items, timestamps, actions = data.sequence(row)
        out.append(
            History(data.item_vocab.to_raw(items), timestamps, np.rint(ratings_of[actions]).astype(np.int64))
        )
    return out


def test_perf_analyzer_sweep_on_a_tiny_model(
    tiny_checkpoint: Path, tiny_data: DataConfig, tmp_path: Path
) -> None:
    cfg = dataclasses.replace(
        ServingBenchConfig(), work_dir=tmp_path / "work", retrieve_k=30, window_s=1.0, min_requests=5
    )
    repository = build(tiny_checkpoint, SMALL_TORCH, cfg)
    histories = _histories(tiny_data, 8)
    inputs = write_input_data(tmp_path / "inputs.json", [recommend_entry(h, k=10) for h in histories])
    with running_servers([repository], threads=1, log_dir=tmp_path / "logs") as (server,):
        rate = warm_up(server.url, histories, requests=2, k=10)
        target = Target("tiny", server.url, "recommend", inputs, rate)
        sweep([target], (1, 2), cfg, tmp_path / "raw")

    assert [p.concurrency for p in target.points] == [1, 2]
    for point in target.points:
        rows = parse_perf_csv(tmp_path / "raw" / f"tiny__recommend__c{point.concurrency}.csv")
        assert rows[0]["Inferences/Second"] > 0
        assert point.throughput > 0 and 0 < point.p50_ms <= point.p99_ms
        # The ensemble's composing models, as perf_analyzer reports them, each saw the window's requests (up to
        # the requests in flight when a window's statistics were read).
        assert {m.model for m in point.composing} == {"recommender"}  # recommend is one fused step
        assert point.server is not None
        assert all(abs(m.inferences - point.server.inferences) <= 2 * point.concurrency for m in point.composing)
        assert all(m.inferences > 0 for m in point.composing)
