"""What dynamic batching can at best buy: each served model's cost per request, in process, by batch size.

    python -m genrec.benchmarks.batching [--checkpoint DIR]

The handlers Triton runs (``genrec.builders.handlers``: validation, id mapping, length grouping and the torch
maths) are called directly on real ML-100K histories, one thread, with batches of 1..64 requests. A batch
costs what its requests cost one by one, minus what they share (per-call overhead, better-shaped matrix
products). The ratio at batch 1 over batch B bounds the throughput that batching B requests can add, before
the server's own costs; the serving benchmark measures what Triton actually gets.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from genrec.benchmarks.common import REPO_ROOT, print_table
from genrec.benchmarks.serving_data import History, ml100k_histories
from genrec.builders.handlers import (
    KV_KEYS,
    KV_TIMESTAMPS,
    KV_VALUES,
    USER_EMBEDDING,
    CandidateScorer,
    Catalogue,
    Handler,
    Request,
    UserEncoder,
)
from genrec.builders.limits import Limits
from genrec.builders.runtimes import TorchRuntime
from genrec.client import protocol
from genrec.training.checkpoint import load_meta

HEADERS = ["model", "batch", "ms per request", "batch 1 / batch"]


@dataclass(frozen=True)
class BatchingConfig:
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    num_histories: int = 64
    num_candidates: int = 100
    rounds: int = 3  # the best of these passes over all histories
    threads: int = 1  # as in each served model instance
    seed: int = 0


def _requests(checkpoint: Path, histories: Sequence[History], cfg: BatchingConfig) -> dict[str, tuple[Handler, list[Request]]]:
    meta = load_meta(checkpoint)
    config = meta.hstu_config()
    runtime = TorchRuntime(checkpoint)
    catalogue = Catalogue.from_meta(meta)
    limits = Limits()
    encoder = UserEncoder(runtime, catalogue, config.max_len, limits)
    shape = (config.num_layers, config.num_heads, config.d_qk, config.d_v)
    scorer = CandidateScorer(runtime, catalogue, shape, limits)
    encode = [
        {
            protocol.HISTORY_ITEM_IDS: h.items[None],
            protocol.HISTORY_TIMESTAMPS: h.timestamps[None],
            protocol.HISTORY_ACTIONS: h.ratings[None],
        }
        for h in histories
    ]
    encoded = encoder.execute(encode)
    rng = np.random.default_rng(cfg.seed)
    score = []
    for out in encoded:
        assert not isinstance(out, Exception), out
        candidates = rng.choice(meta.item_raw_ids, cfg.num_candidates, replace=False).astype(np.int64)
        score.append({
            KV_KEYS: out[KV_KEYS],
            KV_VALUES: out[KV_VALUES],
            KV_TIMESTAMPS: out[KV_TIMESTAMPS],
            USER_EMBEDDING: out[USER_EMBEDDING],
            protocol.CANDIDATE_ITEM_IDS: candidates[None],
        })
    return {"user_encoder": (encoder, encode), "candidate_scorer": (scorer, score)}


def _ms_per_request(handler: Handler, requests: list[Request], batch: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(0, len(requests), batch):
            handler.execute(requests[i : i + batch])
        best = min(best, (time.perf_counter() - start) / len(requests))
    return best * 1e3


def batching_ceiling(
    checkpoint: Path, histories: Sequence[History], cfg: BatchingConfig = BatchingConfig()
) -> list[list[object]]:
    """Rows of HEADERS: per-request cost of each model at each batch size, and its gain over batch 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        rows: list[list[object]] = []
        for name, (handler, requests) in _requests(checkpoint, histories, cfg).items():
            handler.execute(requests[:1])  # warm-up
            single = _ms_per_request(handler, requests, 1, cfg.rounds)
            for batch in cfg.batch_sizes:
                ms = single if batch == 1 else _ms_per_request(handler, requests, batch, cfg.rounds)
                rows.append([name, batch, ms, single / ms])
        return rows
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=REPO_ROOT / "runs" / "bench" / "reference" / "checkpoint",
        help="an HSTU checkpoint (default: the serving benchmark's reference model)",
    )
    args = parser.parse_args(argv)
    cfg = BatchingConfig()
    max_len = load_meta(args.checkpoint).model_config.max_len
    histories = ml100k_histories(cfg.num_histories, max_len=max_len, seed=cfg.seed)
    print_table(f"per-request cost by batch size, in process, {cfg.threads} thread", HEADERS,
                batching_ceiling(args.checkpoint, histories, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
