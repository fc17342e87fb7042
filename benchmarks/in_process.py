"""The same recommend pipeline through Triton and in process, timed alternately: what serving costs."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from genrec.benchmarks.common import Timing, time_interleaved
from genrec.benchmarks.serving_config import ServingBenchConfig
from genrec.benchmarks.serving_data import History


@dataclass(frozen=True)
class Overhead:
    label: str
    served: Timing
    in_process: Timing
    same_top_k: int
    compared: int

    @property
    def ratio(self) -> float:
        return self.served.median_s / self.in_process.median_s


def in_process_recommender(checkpoint: Path, k: int, retrieve_k: int) -> Callable[[History], np.ndarray]:
    """``training.pipeline.recommend`` on one raw history, with the server's own preprocessing
    (`handlers.parse_history`, the window of a default build; the whole history excluded): raw ids (k,)."""
    import torch

    from genrec.builders.build import BuildConfig
    from genrec.builders.requests import Catalogue, parse_history
    from genrec.client import protocol
    from genrec.training.batch import SequenceBatch
    from genrec.training.checkpoint import load_checkpoint
    from genrec.training.hstu import HSTU
    from genrec.training.pipeline import recommend

    model, meta = load_checkpoint(checkpoint)
    if not isinstance(model, HSTU):
        raise ValueError(f"{checkpoint} is not an HSTU checkpoint")
    catalogue = Catalogue.from_meta(meta)
    max_len = model.config.max_len
    block = BuildConfig(checkpoint=checkpoint).block(max_len)

    def run(history: History) -> np.ndarray:
        request = {protocol.HISTORY_ITEM_IDS: history.items[None], protocol.HISTORY_TIMESTAMPS: history.timestamps[None],
                   protocol.HISTORY_ACTIONS: history.ratings[None]}
        parsed = parse_history(request, catalogue, max_len, block=block)
        batch = SequenceBatch.from_lists(
            [parsed.items.tolist()], [parsed.timestamps.tolist()], [parsed.actions.tolist()]
        )
        ids, _ = recommend(model, batch, k=k, retrieve_k=retrieve_k, seen=torch.from_numpy(parsed.seen[None]))
        return np.asarray(catalogue.vocab.to_raw(ids[0].numpy()))

    return run


def triton_vs_in_process(
    label: str, url: str, checkpoint: Path, histories: Sequence[History], cfg: ServingBenchConfig
) -> Overhead:
    """Median end-to-end latency of one request through Triton vs the same pipeline in this process, timed
    alternately on the same histories; also how often the two return the same top-k (contract 4)."""
    import torch

    from genrec.client import RecommendClient

    offline = in_process_recommender(checkpoint, cfg.k, cfg.retrieve_k)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.server_threads)  # what each model instance of the server gets
    try:
        with RecommendClient(url, timeout_s=300, retries=0) as client:

            def served(h: History) -> np.ndarray:
                return client.recommend(
                    h.items, k=cfg.k, timestamps=h.timestamps, actions=h.ratings, exclude_seen=True
                ).item_ids

            same = sum(bool(np.array_equal(served(h), offline(h))) for h in histories)
            served_cycle, offline_cycle = itertools.cycle(histories), itertools.cycle(histories)
            served_timing, offline_timing = time_interleaved(
                [lambda: served(next(served_cycle)), lambda: offline(next(offline_cycle))],
                warmup=2,
                repeats=cfg.overhead_requests,
            )
    finally:
        torch.set_num_threads(threads)
    return Overhead(label, served_timing, offline_timing, same, len(histories))


# ---- report -----------------------------------------------------------------------------------------------
