"""The batching ceiling measures every served model at every batch size, on the real handlers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from genrec.benchmarks.batching import HEADERS, BatchingConfig, batching_ceiling
from genrec.benchmarks.serving_data import History
from genrec.training.prepare import DataConfig, prepare


def test_ceiling_rows_for_each_model_and_batch(tiny_checkpoint: Path, tiny_data: DataConfig) -> None:
    data, _, _ = prepare(tiny_data)
    histories = []
    for row in range(8):
        items, timestamps, _ = data.sequence(row)
        histories.append(History(data.item_vocab.to_raw(items).astype(np.int64), timestamps, np.zeros_like(items)))
    cfg = BatchingConfig(batch_sizes=(1, 4), num_histories=8, num_candidates=20, rounds=1)
    rows = batching_ceiling(tiny_checkpoint, histories, cfg)
    assert all(len(r) == len(HEADERS) for r in rows)
    assert [(r[0], r[1]) for r in rows] == [(m, b) for m in ("user_encoder", "candidate_scorer") for b in (1, 4)]
    for _, batch, ms, gain in rows:
        assert isinstance(ms, float) and ms > 0
        assert batch != 1 or gain == 1.0
