"""Serving benchmarks through a real tritonserver: perf_analyzer sweeps, locust load, the cost of serving.

    python -m genrec.benchmarks.serving [--quick] [--checkpoint DIR] [--reference-checkpoint DIR]
    genrec bench [--quick]

Models (checkpoints under ``runs/bench/``, made once and reused):
  * small: HSTU preset 'paper' (d=50, 2 layers, 1 head, histories up to 200) trained briefly on ML-100K,
    or ``--checkpoint``;
  * reference: preset 'reference' (d=128, 4 layers, 8 heads, histories up to 512) with the ML-100K
    vocabulary, trained one epoch (or untrained weights through the same checkpoint code; the report says).
Each model is built into fresh repositories (``runs/bench/repos/``), one per served configuration:
reference with dynamic batching on / off, small with the torch / onnx runtime. The two configurations of a
model are served at once by two servers and measured alternately, level by level, so that both see the
same background load on a shared machine.

Requests are real ML-100K histories (raw item ids, timestamps, ratings; lengths as in the data, capped at
the model's max_len), k=10, exclude_seen=true, one user per request, written as perf_analyzer input JSON.

  * perf_analyzer (gRPC, loopback), one run per concurrency level: three time windows of ``window_s``,
    merged (the stability check is loosened to a formality: a shared machine may never settle within 10%).
    Throughput and client p50/p90/p95/p99; for the ensemble, perf_analyzer's per-composing-model
    queue / compute split (printed, not in its CSV) is parsed from its output.
  * each composing model called directly (inputs: the real intermediate tensors of each history).
  * locust, headless, ``benchmarks/locustfile.py`` (RecommendClient), against the batching-on server.
  * Triton vs in-process: ``RecommendClient.recommend`` at concurrency 1 vs ``training.pipeline.recommend``
    on the same checkpoint and histories (batch 1, same torch thread count), timed alternately.
  * the batching ceiling (``genrec.benchmarks.batching``): each served model's per-request cost in process
    at batch 1..64, what dynamic batching could at best save on this machine.

Every server is warmed up first (the first calls are never timed). Results: ``benchmarks/results/serving.md``
and ``serving_latency_throughput.png``; raw CSVs, perf_analyzer output and inputs under ``results/raw/``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from genrec.benchmarks.batching import HEADERS as BATCHING_HEADERS
from genrec.benchmarks.batching import batching_ceiling
from genrec.benchmarks.common import (
    REPO_ROOT,
    RESULTS_DIR,
    Section,
    Timing,
    command_line,
    print_table,
    time_interleaved,
    write_markdown,
)
from genrec.benchmarks.serving_data import (
    History,
    composing_entries,
    length_summary,
    ml100k_histories,
    recommend_entry,
    write_input_data,
)
from genrec.builders.tritonserver import (
    ServerConfig,
    TritonServer,
    find_perf_analyzer,
    find_tritonserver,
    free_ports,
)

Weights = Literal["trained", "untrained"]


@dataclass(frozen=True)
class ServingBenchConfig:
    small_checkpoint: Path | None = None  # None: runs/bench/paper/checkpoint (made there when missing)
    reference_checkpoint: Path | None = (
        None  # None: runs/bench/reference/checkpoint (made there when missing)
    )
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


@dataclass(frozen=True)
class Served:
    """One served configuration: a model, a runtime, batching on or off."""

    label: str
    model: Literal["small", "reference"]
    runtime: Literal["torch", "onnx"] = "torch"
    dynamic_batching: bool = True

    @property
    def slug(self) -> str:
        return f"{self.model}_{self.runtime}_{'batching' if self.dynamic_batching else 'nobatching'}"


REF_ON = Served("reference, batching on", "reference")
REF_OFF = Served("reference, batching off", "reference", dynamic_batching=False)
SMALL_TORCH = Served("small, torch", "small")
SMALL_ONNX = Served("small, onnx", "small", runtime="onnx")


def shown(path: Path) -> Path:
    """A path as a report shows it: relative to the repository when inside it."""
    path = Path(path).absolute()
    return path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path


# ---- checkpoints ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    preset: str
    description: str
    max_len: int


def _describe(path: Path, origin: str) -> tuple[str, int]:
    config = json.loads((path / "config.json").read_text())
    model = config["model"]
    dims = f"d={model['d_model']}, {model['num_layers']} layers, {model['num_heads']} heads, max_len {model['max_len']}"
    metrics_path = path / "metrics.json"
    trained = ""
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        if "epochs_run" in metrics:
            hr = metrics.get("full", {}).get("HR@10")
            trained = f"trained {metrics['epochs_run']} epoch(s) in {metrics.get('train_seconds', '?')} s" + (
                f", test HR@10 {hr:.4f}" if hr is not None else ""
            )
        elif metrics.get("untrained"):
            trained = "UNTRAINED weights (initialisation), saved through the checkpoint code"
    return f"{dims}; {trained}; {origin} `{shown(path)}`", int(model["max_len"])


def save_untrained(preset: str, out: Path, seed: int, max_len: int | None = None) -> None:
    """A model of the preset's size at its initialisation, on ML-100K's vocabulary, as a real checkpoint."""
    import torch

    from genrec.training.checkpoint import CheckpointMeta, save_checkpoint
    from genrec.training.prepare import DataConfig, prepare
    from genrec.training.trainer import TrainConfig, make_model

    data, _, name = prepare(DataConfig())
    config = TrainConfig(preset=preset, epochs=0, out=out.parent, progress=False, seed=seed, max_len=max_len)
    torch.manual_seed(seed)
    model = make_model(config, data).eval()
    meta = CheckpointMeta(
        model_type="hstu",
        model_config=dataclasses.asdict(model.config),
        item_raw_ids=data.item_vocab.raw_ids,
        item_titles=data.item_titles,
        action_values=data.action_values,
        data={
            "name": name,
            "num_users": len(data.users),
            "num_events": int(len(data.items)),
            "genre_names": list(data.genre_names),
        },
        train=dataclasses.asdict(config),
    )
    save_checkpoint(out, model, meta, {"untrained": True})


def make_checkpoint(
    preset: str,
    given: Path | None,
    weights: Weights,
    epochs: int,
    max_minutes: float | None,
    cfg: ServingBenchConfig,
) -> Checkpoint:
    """The given checkpoint, else the one cached under runs/bench, else a new one (trained or untrained)."""
    if given is not None:
        description, max_len = _describe(given, "given")
        return Checkpoint(given, preset, description, max_len)
    trained = cfg.work_dir / preset / "checkpoint"
    untrained = cfg.work_dir / f"{preset}-untrained" / "checkpoint"
    if not cfg.retrain and (trained / "config.json").exists():
        description, max_len = _describe(trained, "reused from")
        return Checkpoint(trained, preset, description, max_len)
    if weights == "trained":
        from genrec.training.prepare import DataConfig, run_training
        from genrec.training.trainer import TrainConfig

        print(
            f"training preset {preset!r} on ML-100K for {epochs} epoch(s) into {trained.parent} ...",
            flush=True,
        )
        run_training(
            DataConfig(),
            TrainConfig(
                preset=preset,
                epochs=epochs,
                max_minutes=max_minutes,
                out=trained.parent,
                progress=False,
                seed=cfg.seed,
            ),
        )
        description, max_len = _describe(trained, "trained by this run into")
        return Checkpoint(trained, preset, description, max_len)
    if cfg.retrain or not (untrained / "config.json").exists():
        save_untrained(preset, untrained, cfg.seed)
    description, max_len = _describe(untrained, "in")
    return Checkpoint(untrained, preset, description, max_len)


# ---- servers ----------------------------------------------------------------------------------------------


MODEL_VERSION = 1  # every benchmark repository is built fresh


def build(checkpoint: Path, served: Served, cfg: ServingBenchConfig) -> Path:
    """A fresh repository for one served configuration (so every model is version ``MODEL_VERSION``)."""
    from genrec.builders.build import BuildConfig, build_repository

    repository = cfg.work_dir / "repos" / served.slug
    shutil.rmtree(repository, ignore_errors=True)
    version = build_repository(
        BuildConfig(
            checkpoint=checkpoint,
            repository=repository,
            runtime=served.runtime,
            retrieve_k=cfg.retrieve_k,
            max_batch_size=cfg.max_batch_size,
            dynamic_batching=served.dynamic_batching,
            max_queue_delay_us=cfg.max_queue_delay_us,
        )
    )
    assert version == MODEL_VERSION, f"{repository} was not empty"
    return repository


def thread_env(threads: int) -> dict[str, str]:
    """Threads of the numeric libraries in each Python-backend model instance. Several instances share the
    cores, and torch's default (one thread per core each) oversubscribes them badly."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


@contextlib.contextmanager
def running_servers(
    repositories: Sequence[Path], threads: int, log_dir: Path, ready_timeout_s: float = 900.0
) -> Iterator[list[TritonServer]]:
    """One tritonserver per repository, all started together (loopback only), stopped on exit."""
    install = find_tritonserver()
    install = dataclasses.replace(install, env={**install.env, **thread_env(threads)})
    ports = free_ports(3 * len(repositories))
    log_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        servers = []
        for i, repository in enumerate(repositories):
            grpc, http, metrics = ports[3 * i : 3 * i + 3]
            server = TritonServer(
                ServerConfig(
                    repository,
                    host="127.0.0.1",
                    grpc_port=grpc,
                    http_port=http,
                    metrics_port=metrics,
                    log_file=log_dir / f"{repository.name}.log",
                ),
                install,
            )
            stack.callback(server.stop)
            server.start()
            servers.append(server)
        for server in servers:
            server.wait_ready(timeout_s=ready_timeout_s)  # a loaded 2-core machine needs minutes, not seconds
        yield servers


def warm_up(url: str, histories: Sequence[History], requests: int, k: int) -> float:
    """Untimed calls (longest history first, then a concurrent burst); returns a rough requests/s at
    concurrency 1, to size the first measurement."""
    from genrec.client import RecommendClient

    chosen = sorted(histories, key=len, reverse=True)[:1] + list(histories[:requests])
    with RecommendClient(url, timeout_s=300, retries=0) as client:
        for h in chosen[:2]:
            client.recommend(h.items, k=k, timestamps=h.timestamps, actions=h.ratings)
        start = time.perf_counter()
        for h in chosen[2:]:
            client.recommend(h.items, k=k, timestamps=h.timestamps, actions=h.ratings)
        rate = max(1, len(chosen) - 2) / max(time.perf_counter() - start, 1e-3)
        client.recommend_batch(
            [h.items for h in chosen],
            k=k,
            timestamps=[h.timestamps for h in chosen],
            actions=[h.ratings for h in chosen],
        )
    return rate


# ---- perf_analyzer ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelStats:
    """Server-side averages of one model over a measurement (perf_analyzer's output), microseconds."""

    model: str
    inferences: int
    executions: int
    queue_us: float
    compute_us: float  # input + infer + output

    @property
    def batch(self) -> float:
        """Average requests per execution: how much the dynamic batcher merged."""
        return self.inferences / self.executions if self.executions else float("nan")

    @property
    def queue_share(self) -> float:
        total = self.queue_us + self.compute_us
        return self.queue_us / total if total else float("nan")


@dataclass(frozen=True)
class PerfPoint:
    label: str
    model: str
    concurrency: int
    requests: int
    throughput: float  # inferences/s
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    server_queue_us: float
    server_compute_us: float
    server: ModelStats | None = None  # the model itself (for an ensemble: queue/compute as it reports them)
    composing: tuple[ModelStats, ...] = ()  # an ensemble's composing models


_STATS = re.compile(
    r"(?P<name>[\w.-]+), version: \d+\s+Inference count: (?P<inf>\d+)\s+Execution count: (?P<exe>\d+)\s+"
    r"Successful request count: \d+\s+Avg request latency: \d+ usec \(overhead \d+ usec \+ queue (?P<queue>\d+) usec "
    r"\+ compute input (?P<cin>\d+) usec \+ compute infer (?P<cinf>\d+) usec \+ compute output (?P<cout>\d+) usec\)"
)
_SERVER = re.compile(
    r"Server:\s+Inference count: (?P<inf>\d+)\s+Execution count: (?P<exe>\d+)\s+Successful request count: \d+\s+"
    r"Avg request latency: \d+ usec \(overhead \d+ usec \+ queue (?P<queue>\d+) usec \+ "
    r"(?:compute (?P<c>\d+) usec|compute input (?P<cin>\d+) usec \+ compute infer (?P<cinf>\d+) usec \+ "
    r"compute output (?P<cout>\d+) usec)\)"
)


def parse_server_stats(model: str, stdout: str) -> tuple[ModelStats | None, tuple[ModelStats, ...]]:
    """perf_analyzer's server-side section: the model's own counts and, for an ensemble, each composing
    model's queue and compute times (which its CSV does not carry)."""
    server = None
    found = _SERVER.search(stdout)
    if found:
        compute = (
            float(found["c"])
            if found["c"] is not None
            else float(found["cin"]) + float(found["cinf"]) + float(found["cout"])
        )
        server = ModelStats(model, int(found["inf"]), int(found["exe"]), float(found["queue"]), compute)
    composing = (
        tuple(
            ModelStats(
                m["name"],
                int(m["inf"]),
                int(m["exe"]),
                float(m["queue"]),
                float(m["cin"]) + float(m["cinf"]) + float(m["cout"]),
            )
            for m in _STATS.finditer(stdout.split("Composing models:", 1)[1])
        )
        if "Composing models:" in stdout
        else ()
    )
    return server, composing


def parse_perf_csv(path: Path) -> list[dict[str, float]]:
    """perf_analyzer's -f CSV: one row per concurrency level, numbers as floats (latencies in usec)."""
    with path.open() as f:
        rows = [
            {key: float(value) for key, value in row.items() if key and value not in (None, "")}
            for row in csv.DictReader(f)
        ]
    return sorted(rows, key=lambda r: r["Concurrency"])


def perf_analyzer_args(
    url: str, model: str, input_data: Path, concurrency: int, window_ms: int, csv_path: Path
) -> list[str]:
    """One concurrency level: three time windows (perf_analyzer's minimum for its stability check, which
    ``-s 1000`` turns into a formality: a shared machine may never settle within the default 10%), merged."""
    return [
        "-m",
        model,
        "-x",  # explicit: without it, perf_analyzer 2.51 sometimes fails to find the version under load
        str(MODEL_VERSION),
        "-i",
        "grpc",
        "-u",
        url,
        "--input-data",
        str(input_data),
        "--concurrency-range",
        str(concurrency),
        "--measurement-mode",
        "time_windows",
        "--measurement-interval",
        str(window_ms),
        "--stability-percentage",
        "1000",
        "--max-trials",
        "3",
        "--percentile",
        "95",
        "-f",
        str(csv_path),
    ]


_CLIENT_REQUESTS = re.compile(r"Client:\s+Request count: (\d+)")


def run_perf_analyzer(
    url: str,
    label: str,
    model: str,
    input_data: Path,
    concurrency: int,
    window_ms: int,
    raw_dir: Path,
    timeout_s: float,
    attempts: int = 2,
) -> PerfPoint:
    """One measurement at one concurrency level (its CSV and output are kept in ``raw_dir``); a failed run
    (perf_analyzer's metadata calls can fail on an overloaded server) is tried again."""
    executable, env = find_perf_analyzer()
    stem = f"{re.sub(r'[^a-z0-9]+', '_', label.lower())}__{model}__c{concurrency}"
    raw_dir.mkdir(parents=True, exist_ok=True)
    csv_path = raw_dir / f"{stem}.csv"
    csv_path.unlink(missing_ok=True)
    args = [str(executable), *perf_analyzer_args(url, model, input_data, concurrency, window_ms, csv_path)]
    for attempt in range(attempts):
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout_s)
        (raw_dir / f"{stem}.log").write_text(" ".join(args) + "\n\n" + done.stdout + done.stderr)
        if done.returncode == 0 and csv_path.exists():
            break
        print(f"  perf_analyzer failed ({done.returncode}), attempt {attempt + 1} of {attempts}", flush=True)
        time.sleep(2.0)
    else:
        raise RuntimeError(
            f"perf_analyzer failed ({done.returncode}) on {model} at concurrency {concurrency}:\n"
            + (done.stdout + done.stderr)[-3000:]
        )
    row = parse_perf_csv(csv_path)[0]
    server, composing = parse_server_stats(model, done.stdout)
    counted = _CLIENT_REQUESTS.search(done.stdout)
    return PerfPoint(
        label=label,
        model=model,
        concurrency=concurrency,
        requests=int(counted[1]) if counted else 0,
        throughput=row["Inferences/Second"],
        p50_ms=row["p50 latency"] / 1e3,
        p90_ms=row["p90 latency"] / 1e3,
        p95_ms=row["p95 latency"] / 1e3,
        p99_ms=row["p99 latency"] / 1e3,
        server_queue_us=row["Server Queue"],
        server_compute_us=row["Server Compute Input"]
        + row["Server Compute Infer"]
        + row["Server Compute Output"],
        server=server,
        composing=composing,
    )


@dataclass
class Target:
    """One thing to measure across concurrency levels, with a running estimate of its rate."""

    label: str
    url: str
    model: str
    input_data: Path
    rate: float  # requests/s, last measured (or estimated from the warm-up)
    points: list[PerfPoint] = field(default_factory=list)


def window_ms(rate: float, concurrency: int, cfg: ServingBenchConfig) -> int:
    """``window_s``, or longer when a window would hold fewer than ``min_requests`` requests (perf_analyzer
    fails on a window without one)."""
    needed_s = max(cfg.min_requests, 2 * concurrency) / max(rate, 1e-3)
    return int(1000 * min(cfg.max_window_s, max(cfg.window_s, needed_s)))


def measure(target: Target, concurrency: int, cfg: ServingBenchConfig, raw_dir: Path) -> PerfPoint:
    window = window_ms(target.rate, concurrency, cfg)
    point = run_perf_analyzer(
        target.url,
        target.label,
        target.model,
        target.input_data,
        concurrency,
        window,
        raw_dir,
        timeout_s=60 + 10 * window / 1000,
    )
    target.rate = point.throughput
    target.points.append(point)
    print(
        f"  {target.label:28s} {target.model:16s} c={concurrency:<3d} n={point.requests:<5d} "
        f"{point.throughput:8.1f} infer/s  p50 {point.p50_ms:8.1f} ms  p95 {point.p95_ms:8.1f} ms",
        flush=True,
    )
    return point


def sweep(targets: Sequence[Target], levels: Sequence[int], cfg: ServingBenchConfig, raw_dir: Path) -> None:
    """Every target at every level, alternating targets within a level (shared background load)."""
    for concurrency in levels:
        for target in targets:
            measure(target, concurrency, cfg, raw_dir)


# ---- locust -----------------------------------------------------------------------------------------------


LOCUSTFILE = Path(__file__).with_name("locustfile.py")


@dataclass(frozen=True)
class LocustResult:
    users: int
    seconds: int
    requests: int
    failures: int
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    command: str
    killed: bool = False  # locust hung past its run and was killed; its statistics are as last written


def locust_args(url: str, users: int, seconds: int, csv_prefix: Path) -> list[str]:
    return [
        "-f",
        str(shown(LOCUSTFILE)),
        "--headless",
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{seconds}s",
        "--host",
        f"grpc://{url}",
        "--csv",
        str(csv_prefix),
        "--only-summary",
        "--reset-stats",
        "--stop-timeout",
        "15",
    ]


LOCUST_REQUEST_TIMEOUT_S = 10  # per recommend call; a slower one counts as a failure
LOCUST_GRACE_S = 90  # past the run's duration, before locust is killed as hung


def run_locust(url: str, histories_json: Path, users: int, seconds: int, raw_dir: Path) -> LocustResult:
    """Headless locust against the server; its statistics of the ``recommend`` requests.

    Bounded: every call has a deadline, and a locust that has not exited ``LOCUST_GRACE_S`` after its run
    ended is killed; whatever statistics it wrote are still read (the report says it was killed).
    """
    prefix = raw_dir / "locust"
    args = locust_args(url, users, seconds, prefix)
    env = {**os.environ, "GENREC_HISTORIES": str(histories_json), "GENREC_TIMEOUT_S": str(LOCUST_REQUEST_TIMEOUT_S)}
    process = subprocess.Popen(
        [sys.executable, "-m", "locust", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    killed = False
    try:
        output, _ = process.communicate(timeout=seconds + LOCUST_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        output, _ = process.communicate()
        killed = True
    (raw_dir / "locust.log").write_text(output)
    stats = Path(f"{prefix}_stats.csv")
    if not stats.exists():
        raise RuntimeError(
            f"locust wrote no statistics (exit {process.returncode}{', killed' if killed else ''}):\n{output[-3000:]}"
        )
    with stats.open() as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] == "recommend"]
    if not rows:
        raise RuntimeError(f"locust recorded no 'recommend' requests:\n{output[-3000:]}")
    row = rows[0]
    return LocustResult(
        users=users,
        seconds=seconds,
        requests=int(row["Request Count"]),
        failures=int(row["Failure Count"]),
        requests_per_s=float(row["Requests/s"]),
        p50_ms=float(row["50%"]),
        p95_ms=float(row["95%"]),
        p99_ms=float(row["99%"]),
        max_ms=float(row["Max Response Time"]),
        command=f"GENREC_HISTORIES={shown(histories_json)} GENREC_TIMEOUT_S={LOCUST_REQUEST_TIMEOUT_S} locust "
        + " ".join(locust_args("127.0.0.1:PORT", users, seconds, shown(prefix))),
        killed=killed,
    )


# ---- Triton vs in-process ---------------------------------------------------------------------------------


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
    from genrec.builders.handlers import Catalogue, parse_history
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


def _ms(us: float) -> float:
    return us / 1e3


def _p95(timing: Timing) -> float:
    return timing.percentile(95) * 1e3


def plot(targets: Sequence[Target], image: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for target in targets:
        xs = [p.throughput for p in target.points]
        ys = [p.p95_ms for p in target.points]
        ax.plot(xs, ys, marker="o", label=target.label)
        for p in target.points:
            ax.annotate(
                f"c={p.concurrency}",
                (p.throughput, p.p95_ms),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    ax.set_xlabel("throughput (inferences/s)")
    ax.set_ylabel("p95 latency (ms)")
    ax.set_yscale("log")
    ax.set_title("recommend through tritonserver: p95 latency vs throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    image.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(image, dpi=120)
    plt.close(fig)


SWEEP_HEADERS = (
    "configuration",
    "concurrency",
    "requests",
    "infer/s",
    "p50 ms",
    "p90 ms",
    "p95 ms",
    "p99 ms",
    "avg batch (recommender)",
)


def sweep_rows(targets: Sequence[Target]) -> list[list[object]]:
    rows: list[list[object]] = []
    for target in targets:
        for p in target.points:
            encoder = next((m for m in p.composing if m.model == "recommender"), None)
            rows.append(
                [
                    target.label,
                    p.concurrency,
                    p.requests,
                    p.throughput,
                    p.p50_ms,
                    p.p90_ms,
                    p.p95_ms,
                    p.p99_ms,
                    encoder.batch if encoder else float("nan"),
                ]
            )
    return rows


def comparison_rows(a: Target, b: Target) -> list[list[object]]:
    rows: list[list[object]] = []
    for pa, pb in zip(a.points, b.points, strict=True):
        rows.append(
            [
                pa.concurrency,
                pa.throughput,
                pb.throughput,
                pa.throughput / pb.throughput,
                pa.p95_ms,
                pb.p95_ms,
            ]
        )
    return rows


def composing_rows(targets: Sequence[Target], levels: Sequence[int]) -> list[list[object]]:
    rows: list[list[object]] = []
    for target in targets:
        for p in target.points:
            if p.concurrency not in levels:
                continue
            for m in p.composing:
                rows.append(
                    [
                        target.label,
                        p.concurrency,
                        m.model,
                        m.batch,
                        _ms(m.queue_us),
                        _ms(m.compute_us),
                        100 * m.queue_share,
                    ]
                )
    return rows


def direct_rows(targets: Sequence[Target]) -> list[list[object]]:
    rows: list[list[object]] = []
    for target in targets:
        for p in target.points:
            batch = p.server.batch if p.server else float("nan")
            share = 100 * p.server_queue_us / max(p.server_queue_us + p.server_compute_us, 1e-9)
            rows.append(
                [
                    target.model,
                    p.concurrency,
                    p.requests,
                    p.throughput,
                    p.p50_ms,
                    p.p95_ms,
                    batch,
                    _ms(p.server_queue_us),
                    _ms(p.server_compute_us),
                    share,
                ]
            )
    return rows


def _load() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} cores"


# ---- the benchmark ----------------------------------------------------------------------------------------


def run(cfg: ServingBenchConfig, command: str) -> int:
    started = time.monotonic()
    load_start = _load()
    raw = cfg.out_dir / "raw" / "serving"
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
    print(f"serving benchmark: {dataclasses.asdict(cfg)}", flush=True)

    small = make_checkpoint(
        "paper", cfg.small_checkpoint, cfg.small_weights, cfg.small_epochs, cfg.small_max_minutes, cfg
    )
    models = {"small": small}
    if cfg.comparisons:
        models["reference"] = make_checkpoint(
            "reference",
            cfg.reference_checkpoint,
            cfg.reference_weights,
            cfg.reference_epochs,
            cfg.reference_max_minutes,
            cfg,
        )
    groups: list[tuple[str, list[Served]]] = (
        [("reference", [REF_ON, REF_OFF]), ("small", [SMALL_TORCH, SMALL_ONNX])]
        if cfg.comparisons
        else [("small", [SMALL_TORCH])]
    )

    longest = max(c.max_len for c in models.values())
    pool = ml100k_histories(cfg.num_histories, max_len=longest, seed=cfg.seed)
    histories = {
        name: [
            History(h.items[-c.max_len :], h.timestamps[-c.max_len :], h.ratings[-c.max_len :]) for h in pool
        ]
        for name, c in models.items()
    }
    inputs = {
        name: write_input_data(
            raw / f"inputs_recommend_{name}.json", [recommend_entry(h, cfg.k, exclude_seen=True) for h in hs]
        )
        for name, hs in histories.items()
    }
    print(f"data: {length_summary(pool)} (before capping at each model's max_len)", flush=True)

    recommend_targets: dict[str, Target] = {}
    direct: list[Target] = []
    composing_model_of = ""
    locust: LocustResult | None = None
    overheads: list[Overhead] = []
    server_seconds: dict[str, float] = {}
    for name, configs in groups:
        checkpoint = models[name]
        repositories = [build(checkpoint.path, served, cfg) for served in configs]
        t0 = time.monotonic()
        with running_servers(repositories, cfg.server_threads, raw / "server_logs") as servers:
            server_seconds[name] = time.monotonic() - t0
            print(f"{len(servers)} server(s) for {name} ready in {server_seconds[name]:.0f} s", flush=True)
            targets = []
            for served, server in zip(configs, servers, strict=True):
                rate = warm_up(server.url, histories[name], cfg.warmup_requests, cfg.k)
                targets.append(Target(served.label, server.url, "recommend", inputs[name], rate))
            sweep(targets, cfg.concurrency, cfg, raw)
            for target in targets:
                recommend_targets[target.label] = target

            main_url = servers[0].url  # batching on, torch
            if name == groups[0][0]:
                composing_model_of = configs[0].label
                subset = histories[name][: cfg.composing_histories]
                entries = composing_entries(main_url, subset, k=cfg.k, exclude_seen=True)
                for model, model_entries in entries.items():
                    path = write_input_data(raw / f"inputs_{model}_{name}.json", model_entries)
                    direct.append(Target(configs[0].label, main_url, model, path, targets[0].rate))
                sweep(direct, cfg.composing_concurrency, cfg, raw)
                locust = run_locust(main_url, inputs[name], cfg.locust_users, cfg.locust_seconds, raw)
                print(
                    f"  locust: {locust.requests} requests, {locust.failures} failures, "
                    f"{locust.requests_per_s:.1f} req/s, p95 {locust.p95_ms:.0f} ms",
                    flush=True,
                )
            for served, server in zip(configs, servers, strict=True):
                if served.runtime != "torch":  # the in-process pipeline is torch
                    continue
                o = triton_vs_in_process(served.label, server.url, checkpoint.path, histories[name], cfg)
                overheads.append(o)
                print(
                    f"  {served.label}: Triton {o.served.median_ms:.1f} ms vs in-process "
                    f"{o.in_process.median_ms:.1f} ms (x{o.ratio:.2f}), same top-{cfg.k} {o.same_top_k}/{o.compared}",
                    flush=True,
                )

    ceiling: list[list[object]] = []
    if "reference" in models:  # after the servers are gone, so it has the cores to itself
        print("batching ceiling: each model's per-request cost by batch size, in process ...", flush=True)
        ceiling = batching_ceiling(models["reference"].path, histories["reference"])
    elapsed = time.monotonic() - started
    report(
        cfg,
        command,
        models,
        recommend_targets,
        direct,
        composing_model_of,
        locust,
        overheads,
        ceiling,
        length_summary(pool),
        server_seconds,
        load_start,
        elapsed,
    )
    return 0


def report(
    cfg: ServingBenchConfig,
    command: str,
    models: dict[str, Checkpoint],
    recommend: dict[str, Target],
    direct: Sequence[Target],
    composing_of: str,
    locust: LocustResult | None,
    overheads: Sequence[Overhead],
    ceiling: Sequence[Sequence[object]],
    data_summary: str,
    server_seconds: dict[str, float],
    load_start: str,
    elapsed: float,
) -> None:
    targets = list(recommend.values())
    image = cfg.out_dir / "serving_latency_throughput.png"
    plot(targets, image)
    url, data = "127.0.0.1:PORT", shown(cfg.out_dir / "raw" / "serving" / "inputs_recommend_MODEL.json")
    pa_command = "perf_analyzer " + " ".join(
        perf_analyzer_args(url, "recommend", data, 0, 0, Path("OUT.csv"))
    ).replace("--concurrency-range 0", "--concurrency-range C").replace(
        "--measurement-interval 0", "--measurement-interval W"
    )
    sections: list[Section] = []

    def add(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]], text: str = "") -> None:
        sections.append(Section(title, headers, rows, text))
        print_table(title, headers, rows)

    sweep_rows_ = sweep_rows(targets)
    print_table("perf_analyzer: recommend", SWEEP_HEADERS, sweep_rows_)
    top = max(cfg.concurrency)
    if REF_ON.label in recommend and REF_OFF.label in recommend:
        on, off = recommend[REF_ON.label], recommend[REF_OFF.label]
        ratio = next(
            a.throughput / b.throughput
            for a, b in zip(on.points, off.points, strict=True)
            if a.concurrency == top
        )
        add(
            "Dynamic batching on vs off (reference size)",
            ("concurrency", "on infer/s", "off infer/s", "on / off", "on p95 ms", "off p95 ms"),
            comparison_rows(on, off),
            f"Throughput with dynamic batching (max_queue_delay {cfg.max_queue_delay_us} us, max_batch_size "
            f"{cfg.max_batch_size}) over without, at concurrency {top}: **x{ratio:.2f}**. "
            "Two servers of the same checkpoint, measured alternately level by level. The served models split "
            "a dynamic batch into groups of similar history length (attention is quadratic in the padded "
            "length), so a batch costs about what its requests cost one by one: on this CPU the work per "
            "request is compute, not overhead, and batching can only share the little that is overhead. The "
            "next table measures that ceiling.",
        )
    if ceiling:
        add(
            "Batching ceiling: per-request cost by batch size, in process (reference size)",
            BATCHING_HEADERS,
            ceiling,
            "`python -m genrec.benchmarks.batching`: the served handlers (validation, id mapping, length "
            "grouping, torch) called directly on the same histories, 1 thread as in each model instance, "
            "100 candidates per request. 'batch 1 / batch' bounds what dynamic batching can add to throughput "
            "on this machine before Triton's own costs.",
        )
    if SMALL_TORCH.label in recommend and SMALL_ONNX.label in recommend:
        add(
            "torch vs onnx runtime (small model)",
            ("concurrency", "torch infer/s", "onnx infer/s", "torch / onnx", "torch p95 ms", "onnx p95 ms"),
            comparison_rows(recommend[SMALL_TORCH.label], recommend[SMALL_ONNX.label]),
            "Both in the Python backend (the bundled server has no onnxruntime backend). torch runs with "
            f"OMP_NUM_THREADS={cfg.server_threads}; onnxruntime sessions use their own default intra-op pool.",
        )
    levels = sorted({min(cfg.concurrency), top})
    add(
        "Queue vs compute per composing model, inside recommend",
        ("configuration", "concurrency", "model", "avg batch", "queue ms", "compute ms", "queue %"),
        composing_rows(targets, levels),
        "From perf_analyzer's server-side statistics of the ensemble's composing models (its stdout; the CSV "
        "has the ensemble's totals only). avg batch = inferences / executions; compute = input + infer + "
        "output.",
    )
    if direct:
        add(
            f"Composing models called directly ({composing_of})",
            (
                "model",
                "concurrency",
                "requests",
                "infer/s",
                "p50 ms",
                "p95 ms",
                "avg batch",
                "queue ms",
                "compute ms",
                "queue %",
            ),
            direct_rows(direct),
            f"Each model alone, on the real intermediate tensors of {cfg.composing_histories} histories "
            "(computed by the server; K/V as base64 JSON): "
            "`perf_analyzer -m MODEL ... --input-data inputs_MODEL_reference.json`.",
        )
    if locust is not None:
        add(
            f"locust ({composing_of})",
            ("users", "seconds", "requests", "failures", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms"),
            [
                [
                    locust.users,
                    locust.seconds,
                    locust.requests,
                    locust.failures,
                    locust.requests_per_s,
                    locust.p50_ms,
                    locust.p95_ms,
                    locust.p99_ms,
                    locust.max_ms,
                ]
            ],
            f"`{locust.command}` (closed loop, no think time; statistics reset once all users are running). "
            "locust runs on the same 2 cores as the server."
            + (f" Locust did not exit {LOCUST_GRACE_S} s after its run and was killed: these are the statistics "
               "it last wrote." if locust.killed else ""),
        )
    add(
        "Cost of serving: Triton vs in-process (concurrency 1)",
        (
            "configuration",
            "requests",
            "Triton median ms",
            "Triton p95 ms",
            "in-process median ms",
            "in-process p95 ms",
            "Triton / in-process",
            f"same top-{cfg.k}",
        ),
        [
            [
                o.label,
                len(o.served.samples),
                o.served.median_ms,
                _p95(o.served),
                o.in_process.median_ms,
                _p95(o.in_process),
                o.ratio,
                f"{o.same_top_k}/{o.compared}",
            ]
            for o in overheads
        ],
        "`RecommendClient.recommend` without a user_id (gRPC, loopback, the `recommend` ensemble's one step, "
        "the fused `recommender` Python-backend model, whole history computed) vs "
        "`genrec.training.pipeline.recommend` in this process on the same checkpoint, batch 1, "
        f"torch.set_num_threads({cfg.server_threads}), with the server's preprocessing; timed alternately "
        "(one of each per round) after 2 warm-up calls each. `recommender` waits for no company "
        f"(max_queue_delay 0); the other models' {cfg.max_queue_delay_us} us apply to `retrieve` and direct "
        "calls only.",
    )

    notes = [
        *(f"{name} model: {c.description}" for name, c in models.items()),
        f"request data: ML-100K, {data_summary}; each history is a random user's events but the last, "
        f"capped at the model's max_len; k={cfg.k}, exclude_seen=true, retrieve_k={cfg.retrieve_k}",
        f"perf_analyzer 2.51 over gRPC on loopback, one run per level and configuration: `{pa_command}` "
        f"with W = {cfg.window_s * 1000:.0f} ms (longer, up to {cfg.max_window_s:g} s, where a window would hold "
        f"fewer than {cfg.min_requests} requests); the 3 windows are merged into one result. Count windows "
        "(--request-count / count_windows) are not used: perf_analyzer 2.51 rounds their duration up to whole "
        "seconds, which under-reports throughput by up to 2x for short windows (measured here).",
        f"servers: tritonserver 2.51 (CPU build from nvidia-pytriton), Python backend, 1 instance per model, "
        f"OMP_NUM_THREADS={cfg.server_threads} per instance (torch's default of one thread per core in each of "
        "the four instances oversubscribes 2 cores: ~400 ms per tiny request instead of ~10 ms here); "
        f"start-up took {', '.join(f'{k} {v:.0f} s' for k, v in server_seconds.items())}",
        "every server is warmed up (untimed requests, the longest history first) before any measurement",
        f"SHARED, NOISY machine: load average {load_start} at the start, {_load()} at the end; other "
        "engineers' jobs ran alongside. Compare configurations measured together (same table), not absolute "
        "numbers across runs.",
        "raw perf_analyzer CSVs and outputs, locust CSVs, inputs and server logs: "
        f"`{shown(cfg.out_dir / 'raw' / 'serving')}`",
        f"benchmark config: {dataclasses.replace(cfg, out_dir=Path('benchmarks/results'), work_dir=Path('runs/bench'))}",
        f"total time {elapsed / 60:.1f} min",
    ]
    path = cfg.out_dir / "serving.md"
    write_markdown(
        path,
        "Serving benchmarks: tritonserver, perf_analyzer, locust",
        command,
        SWEEP_HEADERS,
        sweep_rows_,
        notes=notes,
        sections=sections,
        image=image,
    )
    print(f"wrote {path} and {image} in {elapsed / 60:.1f} min")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m genrec.benchmarks.serving",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (< 4 min): the small model only, torch, 2 levels, short locust; "
        "untrained weights unless runs/bench already has trained ones",
    )
    parser.add_argument(
        "--checkpoint", type=Path, help="the small model's checkpoint (default: train 'paper')"
    )
    parser.add_argument("--reference-checkpoint", type=Path, help="the reference-size checkpoint")
    parser.add_argument(
        "--untrained-reference",
        action="store_true",
        help="make a missing reference checkpoint from untrained weights instead of 1 epoch",
    )
    parser.add_argument("--retrain", action="store_true", help="make the checkpoints again")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the .md, .png and raw/ go")
    parser.add_argument(
        "--work-dir", type=Path, default=REPO_ROOT / "runs" / "bench", help="checkpoints and repositories"
    )
    args = parser.parse_args(argv)
    cfg = ServingBenchConfig(
        small_checkpoint=args.checkpoint,
        reference_checkpoint=args.reference_checkpoint,
        retrain=args.retrain,
        out_dir=args.out_dir,
        work_dir=args.work_dir,
    )
    if args.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    if args.untrained_reference:
        cfg = dataclasses.replace(cfg, reference_weights="untrained")
    command = command_line() if argv is None else f"python -m genrec.benchmarks.serving {' '.join(argv)}"
    return run(cfg, command)


if __name__ == "__main__":
    sys.exit(main())
