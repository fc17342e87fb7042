"""perf_analyzer, run and read: its arguments, its CSV, the per-composing-model statistics it prints, and the
sweeps over concurrency levels that the serving benchmark reports."""

from __future__ import annotations

import csv
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from genrec.benchmarks.servers import MODEL_VERSION
from genrec.benchmarks.serving_config import ServingBenchConfig
from genrec.builders.tritonserver import find_perf_analyzer


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
