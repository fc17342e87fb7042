"""The per-user K/V cache through Triton: returning users, cache on vs off, and Triton vs in process.

    python -m genrec.benchmarks.user_cache            # ~3 min on 2 cores
    python -m genrec.benchmarks.user_cache --quick    # ~1.5 min, short histories (a smoke run)

A stream of returning users: each user starts with a history of L events and every request appends 1-5
new ones (seeded). Served by a real tritonserver from a repository built with `genrec build` defaults but
``--threads`` torch threads and a budget that holds every user; `recommend` with ``user_id`` (cache on)
and without it (cache off, the same stream). Untrained weights of the reference size (d=128, 4 layers,
8 heads of 16, max_len 2048 so that no window moves during the stream): speed does not depend on quality.

1. cache on vs off, L in {200, 1000}, concurrency 1 and 16: throughput, p50/p99, hit rate, FLOPs per
   request (counted as in `genrec.benchmarks.kv_cache`) and the GFLOP/s they ran at, beside the machine's
   measured fp32 matmul peak;
2. Triton vs the same work in process (`load_handler("recommender")` of the same repository, its own
   cache) and a `recommender` that does nothing (the floor), concurrency 1, interleaved in blocks, for
   the reference model and the small (paper) one;
3. a budget that holds ~1/10 of the users: the bytes in use read from the metrics port never exceed it,
   the hit rate, and the recommender process's resident memory.

Writes benchmarks/results/user_cache.md and user_cache.png. Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from genrec.benchmarks.common import (
    REPO_ROOT,
    RESULTS_DIR,
    RunStart,
    Section,
    command_line,
    matmul_peak_gflops,
    percentile,
    print_table,
    start_run,
    write_markdown,
)
from genrec.benchmarks.reliability import rss_mb_by_process
from genrec.benchmarks.servers import running_servers, save_untrained
from genrec.builders.build import BuildConfig, build_repository
from genrec.builders.handlers import Handler, load_handler
from genrec.builders.model_config import read_config
from genrec.client import RecommendClient, protocol
from genrec.training.checkpoint import load_checkpoint
from genrec.training.flops import cached_score_flops, prefill_flops
from genrec.training.hstu import HSTUConfig


@dataclass(frozen=True)
class UserCacheBenchConfig:
    lengths: tuple[int, ...] = (200, 1000)
    concurrency: tuple[int, ...] = (1, 16)
    users: int = 32  # returning users per run (each run its own, starting at L events)
    requests_per_user: int = 12  # timed requests per user per run and arm, after one untimed first visit
    overhead_requests: int = 160  # Triton vs in process vs the floor, each (3 of 4 timed)
    overhead_length: int = 200
    max_append: int = 5
    k: int = 10
    retrieve_k: int = 100
    max_len: int = 2048
    budget_mb: float = 1024.0  # holds every user of the runs above
    eviction_users: int = 80  # the eviction run: 10x the users its budget holds
    eviction_budget_users: int = 8
    eviction_length: int = 200
    eviction_requests: int = 240
    threads: int = 2  # torch threads of each served model (BuildConfig.threads), and of the in-process runs
    work_dir: Path = REPO_ROOT / "runs" / "bench" / "user_cache"
    out_dir: Path = RESULTS_DIR
    seed: int = 0


QUICK = dict(lengths=(50,), users=8, requests_per_user=2, overhead_requests=10, overhead_length=50,
             max_len=256, eviction_users=20, eviction_budget_users=2, eviction_length=50, eviction_requests=40)


class Stream:
    """Each user's whole event list, seeded: L events at the first visit, then 1-max_append more per visit."""

    def __init__(self, item_ids: np.ndarray, length: int, users: int, visits: int, max_append: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        n = length + visits * max_append
        self.items = item_ids[rng.integers(len(item_ids), size=(users, n))]
        self.timestamps = 1_600_000_000 + np.cumsum(rng.integers(0, 3600, size=(users, n)), axis=1)
        self.actions = rng.integers(1, 6, size=(users, n))
        self.ends = length + np.cumsum(np.concatenate(
            [np.zeros((users, 1), np.int64), rng.integers(1, max_append + 1, size=(users, visits))], axis=1), axis=1)

    def request(self, user: int, visit: int) -> dict:
        end = int(self.ends[user, visit])
        return dict(user_seq=self.items[user, :end], timestamps=self.timestamps[user, :end],
                    actions=self.actions[user, :end])

    def appended(self, user: int, visit: int) -> int:
        return int(self.ends[user, visit] - self.ends[user, visit - 1]) if visit else int(self.ends[user, 0])


@dataclass
class RunResult:
    latencies_s: list[float]
    wall_s: float
    hits: int
    requests: int

    @property
    def throughput(self) -> float:
        return self.requests / self.wall_s

    def p(self, q: float) -> float:
        return percentile(self.latencies_s, q) * 1e3


PHASE_VISITS = 3  # visits per phase of `run_arms`: every phase ends by waiting for its slowest caller


def run_arms(url: str, stream: Stream, prefix: str, concurrency: int, visits: int, k: int) -> dict[bool, RunResult]:
    """Closed loop: `concurrency` callers, each with its own users in turn, cache on and off alternating in
    phases of `PHASE_VISITS` visits (which arm goes first alternating too), so both see the same background load
    of a shared machine (run one after the other, the L=1000 on / off ratio moved from 6.0 to 3.9 between two
    runs on one host). Every user's first visit is untimed (it fills the cache); of the next `visits`, each
    arm's throughput is its requests over the wall time of its own phases, each from the callers' common start
    to the last one's end."""
    users = stream.items.shape[0]
    latencies: dict[bool, list[float]] = {False: [], True: []}
    hits = {False: 0, True: 0}
    walls = {False: 0.0, True: 0.0}
    lock = threading.Lock()
    phase = threading.Barrier(concurrency + 1)
    blocks = [range(start, min(start + PHASE_VISITS, visits + 1)) for start in range(1, visits + 1, PHASE_VISITS)]
    order = [(block, cached) for i, block in enumerate(blocks) for cached in ((False, True), (True, False))[i % 2]]

    def caller(worker: int) -> None:
        mine = list(range(worker, users, concurrency))
        with RecommendClient(url, timeout_s=300) as client:
            def send(user: int, visit: int, cached: bool) -> int:
                user_id = f"{prefix}-{user}" if cached else None
                return client.recommend(k=k, user_id=user_id, **stream.request(user, visit)).cached_events

            for user in mine:
                send(user, 0, True)
                send(user, 0, False)
            for block, cached in order:
                phase.wait()
                for visit in block:
                    for user in mine:
                        began = time.perf_counter()
                        got = send(user, visit, cached)
                        elapsed = time.perf_counter() - began
                        with lock:
                            latencies[cached].append(elapsed)
                            hits[cached] += got > 0
                phase.wait()

    threads = [threading.Thread(target=caller, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for _, cached in order:
        phase.wait()
        began = time.perf_counter()
        phase.wait()
        walls[cached] += time.perf_counter() - began
    for t in threads:
        t.join()
    return {cached: RunResult(latencies[cached], walls[cached], hits[cached], len(latencies[cached]))
            for cached in (False, True)}


def request_flops(c: HSTUConfig, length: int, new: int, retrieve_k: int, num_items: int, cached: bool) -> int:
    """One `recommend`: the prefill (new events on the cache, or the whole history), retrieval over the
    item table, re-ranking retrieve_k candidates against the history."""
    prefill = prefill_flops(c, new, length) if cached else prefill_flops(c, length + new)
    return prefill + 2 * c.d_model * num_items + cached_score_flops(c, length + new, retrieve_k)


def _checkpoint(preset: str, cfg: UserCacheBenchConfig) -> Path:
    out = cfg.work_dir / f"{preset}-{cfg.max_len}" / "checkpoint"
    if not (out / "config.json").exists():
        save_untrained(preset, out, cfg.seed, max_len=cfg.max_len)
    return out


def _build(checkpoint: Path, name: str, budget_mb: float, cfg: UserCacheBenchConfig) -> Path:
    repository = cfg.work_dir / "repos" / name
    shutil.rmtree(repository, ignore_errors=True)
    build_repository(BuildConfig(checkpoint=checkpoint, repository=repository, retrieve_k=cfg.retrieve_k,
                                 user_cache_mb=budget_mb, threads=cfg.threads))
    return repository


FLOOR_MODEL_PY = """import numpy as np
import triton_python_backend_utils as pb_utils

from genrec.client import protocol


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            items = pb_utils.get_input_tensor_by_name(request, protocol.HISTORY_ITEM_IDS).as_numpy()
            k = pb_utils.get_input_tensor_by_name(request, protocol.K)
            n = min(int(k.as_numpy()[0, 0]) if k is not None else 10, items.shape[1])
            zero = np.zeros((1, 1), np.int32)
            tensors = {protocol.ITEM_IDS: items[:, :n], protocol.SCORES: np.zeros((1, n), np.float32),
                       protocol.NUM_UNKNOWN: zero, protocol.NUM_TRUNCATED: zero, protocol.CACHED_EVENTS: zero}
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor(name, a) for name, a in tensors.items()]))
        return out
"""


def floor_repository(repository: Path) -> Path:
    """A copy of ``repository`` whose ``recommender`` does nothing (its first k history ids, zero scores and
    counts): the same client, gRPC, ``recommend`` ensemble, tensors and Python backend, none of the work. Its
    latency is the floor of any Python-backend ``recommend`` here."""
    floor = repository.with_name(f"{repository.name}-floor")
    shutil.rmtree(floor, ignore_errors=True)
    shutil.copytree(repository, floor)
    (floor / "recommender" / "1" / "model.py").write_text(FLOOR_MODEL_PY)
    return floor


def send_visits(client: RecommendClient, stream: Stream, k: int, visits: range) -> list[float]:
    """Seconds of each request of ``visits`` (visit by visit, the users in turn, one request at a time), each
    user under its own id."""
    times = []
    for visit in visits:
        for user in range(stream.items.shape[0]):
            began = time.perf_counter()
            client.recommend(k=k, user_id=f"overhead-{user}", **stream.request(user, visit))
            times.append(time.perf_counter() - began)
    return times


def server_time_ms(url: str, models: Sequence[str]) -> dict[str, dict[str, tuple[int, int]]]:
    """Triton's cumulative per-model statistics: phase -> (count, ns)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as raw:
        out = {}
        for model in models:
            stats = raw.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
            out[model] = {phase: (int(v.get("count", 0)), int(v.get("ns", 0))) for phase, v in stats.items()}
        return out


def phase_ms(before: dict, after: dict, model: str, phase: str) -> float:
    count = after[model][phase][0] - before[model][phase][0]
    return (after[model][phase][1] - before[model][phase][1]) / max(count, 1) / 1e6


def call_in_process(handler: Handler, stream: Stream, k: int, visits: range) -> list[float]:
    """`send_visits` for a `recommender` handler in this process: the arrays Triton would hand it."""
    times = []
    for visit in visits:
        for user in range(stream.items.shape[0]):
            kwargs = stream.request(user, visit)
            arrays = {
                protocol.HISTORY_ITEM_IDS: kwargs["user_seq"][None],
                protocol.HISTORY_TIMESTAMPS: kwargs["timestamps"][None],
                protocol.HISTORY_ACTIONS: kwargs["actions"][None],
                protocol.K: np.array([[k]], np.int32),
                protocol.EXCLUDE_SEEN: np.array([[True]]),
                protocol.USER_ID: np.array([[f"overhead-{user}".encode()]], dtype=np.object_),
            }
            began = time.perf_counter()
            (result,) = handler.execute([arrays])
            times.append(time.perf_counter() - began)
            assert not isinstance(result, Exception), result
    return times


# The interleaved comparison runs each arm for a block of visits at a time: a pause first (a request's OpenMP
# threads spin for a while after its last parallel region, libgomp's default spin count, a few ms, and would slow
# the next arm's first request), then one untimed visit (the first requests after an idle spell run up to 1.5x
# slower, on this VM in process too), then the timed ones back to back, as a closed loop sends them.
ARM_PAUSE_S = 0.05
BLOCK_VISITS = 4


def in_process_vs_triton(url: str, floor_url: str, repository: Path, stream: Stream,
                         cfg: UserCacheBenchConfig) -> dict[str, float]:
    """Median ms of the same cached stream through Triton, through the recommender in this process (the same
    repository, its own cache) and through the `floor_repository`'s server, interleaved in blocks of
    `BLOCK_VISITS` visits, the arms in turn (their order rotating), so all three see the same background load of
    a shared machine: run one after the other, the ratio moved by 2x between runs on one host. First visits
    (whole histories) are not counted."""
    import torch

    torch.set_num_threads(cfg.threads)
    config = read_config(repository / "recommender" / "config.pbtxt")
    handler = load_handler("recommender", repository / "recommender" / "1",
                           {key: value.string_value for key, value in config.parameters.items()})
    models = (protocol.RECOMMEND, "recommender")
    times: dict[str, list[float]] = {"triton": [], "local": [], "floor": []}
    ratios = []  # per block: Triton / in process
    with RecommendClient(url, timeout_s=300) as client, RecommendClient(floor_url, timeout_s=300) as floor:
        arms: dict[str, Callable[[range], list[float]]] = {
            "triton": lambda visits: send_visits(client, stream, cfg.k, visits),
            "local": lambda visits: call_in_process(handler, stream, cfg.k, visits),
            "floor": lambda visits: send_visits(floor, stream, cfg.k, visits),
        }
        for arm in arms.values():  # first visits: whole histories, not counted
            arm(range(1))
        before = server_time_ms(url, models)
        names = list(arms)
        for block, start in enumerate(range(1, stream.ends.shape[1] - BLOCK_VISITS + 1, BLOCK_VISITS)):
            got = {}
            for name in names[block % 3:] + names[: block % 3]:
                time.sleep(ARM_PAUSE_S)
                arms[name](range(start, start + 1))
                got[name] = arms[name](range(start + 1, start + BLOCK_VISITS))
                times[name] += got[name]
            ratios.append(float(np.median(got["triton"]) / np.median(got["local"])))
        time.sleep(0.5)  # Triton counts an ensemble's request just after answering it
        after = server_time_ms(url, models)
    return {
        "triton_ms": float(np.median(times["triton"]) * 1e3),
        "in_process_ms": float(np.median(times["local"]) * 1e3),
        "floor_ms": float(np.median(times["floor"]) * 1e3),
        "ratio_p25": percentile(ratios, 25),
        "ratio_p75": percentile(ratios, 75),
        # where a request's time goes (means), from Triton's statistics
        "server_ms": phase_ms(before, after, protocol.RECOMMEND, "success"),
        "queue_ms": phase_ms(before, after, "recommender", "queue"),
        "stub_ms": phase_ms(before, after, "recommender", "compute_infer"),
        "io_ms": phase_ms(before, after, "recommender", "compute_input") + phase_ms(before, after, "recommender",
                                                                                   "compute_output"),
        "client_mean_ms": float(np.mean(times["triton"]) * 1e3),
    }


def run(cfg: UserCacheBenchConfig, command: str) -> None:
    start = start_run(cfg, cfg.threads)
    peak = matmul_peak_gflops()
    reference = _checkpoint("reference", cfg)
    small = _checkpoint("paper", cfg)
    model, meta = load_checkpoint(reference)
    c = model.config
    item_ids = meta.item_raw_ids.astype(np.int64)
    num_items = len(item_ids)
    rows, overhead_rows = [], []
    results: dict = {"peak_gflops": peak, "runs": [], "overhead": [], "eviction": {}}
    repos = {"reference": _build(reference, "reference", cfg.budget_mb, cfg),
             "small": _build(small, "small", cfg.budget_mb, cfg)}
    with running_servers([repos["reference"], repos["small"]], cfg.threads, cfg.work_dir / "logs") as servers:
        ref_server, small_server = servers
        mean_new = (1 + cfg.max_append) / 2
        for length in cfg.lengths:
            for concurrency in cfg.concurrency:
                stream = Stream(item_ids, length, cfg.users, cfg.requests_per_user, cfg.max_append, cfg.seed + length)
                print(f"L={length} concurrency {concurrency}, cache off and on ...", flush=True)
                measured = run_arms(ref_server.url, stream, f"L{length}-c{concurrency}", concurrency,
                                    cfg.requests_per_user, cfg.k)
                for cached, result in measured.items():
                    flops = request_flops(c, length, round(mean_new), cfg.retrieve_k, num_items, cached)
                    rows.append([length, concurrency, "on" if cached else "off", result.throughput,
                                 result.p(50), result.p(99), result.hits / result.requests, flops / 1e6,
                                 flops / (result.p(50) / 1e3) / 1e9 if concurrency == 1 else
                                 flops * result.throughput / 1e9])
                    results["runs"].append(dict(length=length, concurrency=concurrency, cached=cached,
                                                throughput=result.throughput, p50_ms=result.p(50),
                                                p99_ms=result.p(99), hit_rate=result.hits / result.requests,
                                                mflops=flops / 1e6))
                rows[-1].append(measured[True].throughput / measured[False].throughput)
                rows[-2].append("")
        for name, server in (("reference", ref_server), ("small", small_server)):
            print(f"Triton vs in process, {name} ...", flush=True)
            stream = Stream(item_ids, cfg.overhead_length, 4, cfg.overhead_requests // 4 + 2, cfg.max_append, 7)
            with running_servers([floor_repository(repos[name])], cfg.threads, cfg.work_dir / "logs") as (floor,):
                t = in_process_vs_triton(server.url, floor.url, repos[name], stream, cfg)
            overhead_rows.append([name, cfg.overhead_length, t["triton_ms"], t["in_process_ms"],
                                  t["triton_ms"] / t["in_process_ms"],
                                  f"{t['ratio_p25']:.2f}-{t['ratio_p75']:.2f}", t["floor_ms"],
                                  (t["in_process_ms"] + t["floor_ms"]) / t["in_process_ms"], t["client_mean_ms"],
                                  t["server_ms"], t["queue_ms"], t["io_ms"], t["stub_ms"]])
            results["overhead"].append(dict(model=name, **t))
    results["eviction"] = eviction_run(reference, item_ids, cfg)
    write_report(cfg, command, start, c, num_items, peak, rows, overhead_rows, results)


def eviction_run(checkpoint: Path, item_ids: np.ndarray, cfg: UserCacheBenchConfig) -> dict:
    """Users drawn uniformly from 10x as many as the budget holds, at concurrency 16."""
    model, _ = load_checkpoint(checkpoint)
    c = model.config
    capacity = cfg.eviction_length + cfg.max_append * 4
    entry = 4 * c.num_layers * int(capacity * 1.5) * c.num_heads * (c.d_qk + c.d_v)  # an arena grows by half
    budget_mb = cfg.eviction_budget_users * entry / 2**20
    repository = _build(checkpoint, "eviction", budget_mb, cfg)
    rng = np.random.default_rng(cfg.seed)
    stream = Stream(item_ids, cfg.eviction_length, cfg.eviction_users, cfg.eviction_requests, cfg.max_append, 3)
    visits = np.zeros(cfg.eviction_users, np.int64)
    order = rng.integers(cfg.eviction_users, size=cfg.eviction_requests)
    hits, peak_bytes, lock, queue = 0, 0.0, threading.Lock(), list(order)
    print(f"eviction: {cfg.eviction_users} users, a budget of {budget_mb:.1f} MB ...", flush=True)
    with running_servers([repository], cfg.threads, cfg.work_dir / "logs") as (server,):
        busy: set[int] = set()

        def caller() -> None:
            nonlocal hits, peak_bytes
            with RecommendClient(server.url, timeout_s=300) as client:
                while True:
                    with lock:
                        pick = next((i for i, u in enumerate(queue) if u not in busy), None)
                        if pick is None:
                            if not queue:
                                return
                            user = -1
                        else:
                            user = int(queue.pop(pick))
                            busy.add(user)
                            visit = int(visits[user])
                            visits[user] += 1
                    if user < 0:
                        time.sleep(0.001)
                        continue
                    got = client.recommend(k=cfg.k, user_id=f"evict-{user}", **stream.request(user, visit))
                    used = server.metric('genrec_user_cache_bytes{model="recommender"}')
                    with lock:
                        busy.discard(user)
                        hits += got.cached_events > 0
                        peak_bytes = max(peak_bytes, used)

        threads = [threading.Thread(target=caller) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rss = rss_mb_by_process(server.pid).get("recommender", float("nan"))
        time.sleep(0.5)  # genrec's series are written just after the responses
        budget = server.metric('genrec_user_cache_budget_bytes{model="recommender"}')
        evictions = server.metric('genrec_user_cache_evictions_total{model="recommender"}')
    return dict(users=cfg.eviction_users, budget_mb=budget / 2**20, peak_mb=peak_bytes / 2**20,
                hit_rate=hits / cfg.eviction_requests, evictions=evictions, recommender_rss_mb=rss,
                requests=cfg.eviction_requests)


def plot(rows: Sequence[Sequence[object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({(int(r[0]), int(r[1])) for r in rows})  # type: ignore[call-overload]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(labels))
    for offset, state in ((-0.2, "off"), (0.2, "on")):
        chosen = {(r[0], r[1]): r for r in rows if r[2] == state}
        axes[0].bar(x + offset, [chosen[lab][3] for lab in labels], 0.4, label=f"cache {state}")
        axes[1].bar(x + offset, [chosen[lab][5] for lab in labels], 0.4, label=f"cache {state}")
    for ax, title in zip(axes, ("throughput (requests/s)", "p99 latency (ms)"), strict=True):
        ax.set_xticks(x, [f"L={length}\nconc {conc}" for length, conc in labels])
        ax.set_title(title)
        ax.legend()
    axes[1].set_yscale("log")
    fig.suptitle("recommend through Triton: returning users, cache on vs off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(cfg: UserCacheBenchConfig, command: str, start: RunStart, c: HSTUConfig,
                 num_items: int, peak: float, rows: list, overhead_rows: list, results: dict) -> None:
    headers = ["L", "concurrency", "cache", "requests/s", "p50 ms", "p99 ms", "hit rate", "MFLOP/request",
               "GFLOP/s", "on / off throughput"]
    print_table("recommend through Triton", headers, rows)
    overhead_headers = ["model", "L", "Triton p50 ms", "in process p50 ms", "Triton / in process",
                        "per block p25-p75", "floor ms", "floor / in process", "client mean ms", "in server ms", "queue ms", "tensors in/out ms", "Python model ms"]
    print_table("Triton vs in process (cache on, concurrency 1)", overhead_headers, overhead_rows)
    ev = results["eviction"]
    eviction_rows = [[ev["users"], ev["budget_mb"], ev["peak_mb"], ev["hit_rate"], ev["evictions"],
                      ev["recommender_rss_mb"], ev["requests"]]]
    eviction_headers = ["users", "budget MB", "most bytes in use (MB)", "hit rate", "evictions",
                        "recommender RSS MB", "requests"]
    print_table("10x more users than the budget holds", eviction_headers, eviction_rows)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    image = cfg.out_dir / "user_cache.png"
    plot(rows, image)
    (cfg.out_dir / "user_cache.json").write_text(json.dumps(results, indent=1, default=str))
    notes = [
        f"Model: untrained reference size (d={c.d_model}, {c.num_layers} layers, {c.num_heads} heads of "
        f"d_qk={c.d_qk}, d_v={c.d_v}), max_len {c.max_len}, on ML-100K's {num_items} items; k={cfg.k}, "
        f"retrieve_k={cfg.retrieve_k}; {cfg.threads} torch threads per served model; fp32 CPU.",
        f"Stream: {cfg.users} users per run, each first visit (L events) untimed, then {cfg.requests_per_user} "
        f"timed visits appending 1-{cfg.max_append} events each; cache off sends the same requests without "
        f"user_id. The two alternate in phases of {PHASE_VISITS} visits (`run_arms`), so both see the same "
        "background load; throughput = an arm's requests / the wall time of its phases.",
        "FLOPs per request are counted as in kv_cache.py (only the pairs the mask allows): the prefill of the new "
        "events on top of the cache (cache on) or of the whole history (off), retrieval (2·d per item) and "
        f"re-ranking {cfg.retrieve_k} candidates. GFLOP/s: at concurrency 1 FLOPs / p50, at 16 FLOPs x "
        f"throughput. Measured fp32 matmul peak: {peak:.1f} GFLOP/s.",
        "Triton vs in process: the same recommender code and repository, its own cache, the same requests, "
        f"interleaved with the floor's (below) in blocks of {BLOCK_VISITS} visits of the 4 users, the three in "
        f"rotating order, each block after a {ARM_PAUSE_S * 1e3:.0f} ms pause and one untimed visit; per block "
        "p25-p75 = the spread of the per-block ratios, the run's noise. The in-process time is the handler alone (no gRPC, no "
        "Triton, no client validation). Where the Triton request's time goes (means, Triton's statistics): "
        "in server = the `recommend` ensemble's request time; queue, tensors in/out and Python model = the "
        "`recommender` step's phases, the last being its `execute` (the handler plus the Python backend's "
        "request/response handling and genrec's metrics); client mean - in server = client validation, "
        "serialisation and gRPC. floor = the same requests, client and server settings on a copy of the "
        "repository whose `recommender` does nothing (`floor_repository`: the same tensors in and out through "
        "the same ensemble, no work), on its own server; floor / in process = "
        "(in process + floor) / in process, the best ratio any Python-backend model "
        "could reach for this work.",
        "Eviction: users drawn uniformly at random from 10x as many as the budget holds, concurrency 16; the "
        "bytes in use are read from the metrics port after every request.",
        *start.notes,
    ]
    write_markdown(cfg.out_dir / "user_cache.md", "Per-user K/V cache through Triton", command, headers, rows,
                   notes=notes, image=image, machine=start.report_machine,
                   sections=[Section("Triton vs in process (cache on, concurrency 1)", overhead_headers, overhead_rows),
                             Section("10x more users than the budget holds", eviction_headers, eviction_rows)])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short histories, few requests (a smoke run)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    cfg = UserCacheBenchConfig(out_dir=args.out_dir)
    if args.quick:
        cfg = dataclasses.replace(cfg, **QUICK)  # type: ignore[arg-type]
    run(cfg, command_line())


if __name__ == "__main__":
    main()
