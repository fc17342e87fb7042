"""The serving benchmark's settings: what every part of it (servers, perf_analyzer, locust, the in-process
comparison, the report) reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from genrec.benchmarks.common import REPO_ROOT, RESULTS_DIR

Weights = Literal["trained", "untrained"]


@dataclass(frozen=True)
class ServingBenchConfig:
    small_checkpoint: Path | None = None  # None: runs/bench/paper/checkpoint (made there when missing)
    reference_checkpoint: Path | None = None  # None: runs/bench/reference/checkpoint (made there when missing)
    small_weights: Weights = "trained"  # how a missing small checkpoint is made
    reference_weights: Weights = "trained"  # how a missing reference checkpoint is made
    retrain: bool = False  # make the checkpoints again even when runs/bench has them
    small_epochs: int = 3
    small_max_minutes: float = 3.0  # checked between epochs
    reference_epochs: int = 1
    reference_max_minutes: float = 3.0  # checked between epochs; serving speed does not depend on quality
    comparisons: bool = True  # also serve reference with batching off and small with onnx
    work_dir: Path = REPO_ROOT / "runs" / "bench"
    out_dir: Path = RESULTS_DIR
    num_histories: int = 64  # distinct users in the request data (perf_analyzer cycles through them)
    composing_histories: int = 16  # of those, in the direct composing-model runs (K/V inputs are large)
    k: int = 10
    retrieve_k: int = 100
    max_batch_size: int = 64
    max_queue_delay_us: int = 2000
    server_threads: int = 1  # torch threads per model instance (OMP_NUM_THREADS of the server)
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)
    composing_concurrency: tuple[int, ...] = (1, 8)
    window_s: float = 2.0  # perf_analyzer time window; each level measures three
    max_window_s: float = 20.0  # a slow configuration gets longer windows, up to this
    min_requests: int = 10  # per window, for sizing the windows of slow configurations
    warmup_requests: int = 8
    locust_users: int = 16
    locust_seconds: int = 30
    overhead_requests: int = 60  # Triton vs in-process: timed requests of each (after 2 warm-up calls)
    seed: int = 0


QUICK: dict[str, Any] = dict(
    small_weights="untrained",
    reference_weights="untrained",
    comparisons=False,
    num_histories=16,
    composing_histories=8,
    concurrency=(1, 4),
    composing_concurrency=(1,),
    window_s=1.0,
    min_requests=5,
    warmup_requests=4,
    locust_users=8,
    locust_seconds=10,
    overhead_requests=20,
)
