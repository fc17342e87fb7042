"""Top-K retrieval over a 1M-item catalogue: exact brute force (torch) vs FAISS HNSW and IVF.

    python -m genrec.benchmarks.retrieval [--quick]

Catalogue: N synthetic items, d=128, float32, L2-normalised. Learned item embeddings are clustered and of
low intrinsic dimension, and uniform random vectors (the hardest case for any ANN index) would misstate
both recall and latency, so items are a Gaussian mixture (1000 clusters) in a 32-d latent space, mapped
to 128-d by a random linear map, plus small isotropic noise. Query users are drawn from the same
mixture; each excludes a seen history of 50 random items, as served retrieval does.

Measured: recall@100 of each FAISS setting against brute force (same exclusions), index build time, and
latency per call at batch 1 (every query timed on its own) and batch 64 (median and p95).

Counting first, brute force per query: 2·N·d FLOPs (N=1M: 0.26 GFLOP) and N·d·4 bytes of table
(512 MiB), so batch 1 is bound by memory bandwidth (floor = table bytes / measured read rate) and batch
64 by compute (floor = 64·2·N·d / measured matmul rate).
"""

from __future__ import annotations

import dataclasses
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from genrec.benchmarks.common import (
    RESULTS_DIR,
    Section,
    Timing,
    matmul_peak_gflops,
    micro_cli,
    print_table,
    start_run,
    summarize,
    time_call,
    write_markdown,
)
from genrec.training.retrieval import DEFAULT_CHUNK, FaissConfig, build_faiss_index, faiss_top_k, top_k

Search = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (B, D) users, (B, T) exclude -> (B, k) ids


@dataclass(frozen=True)
class RetrievalBenchConfig:
    num_items: int = 1_000_000
    dim: int = 128
    num_clusters: int = 1000
    latent_dim: int = 32
    cluster_spread: float = 0.7  # latent within-cluster std; centres are N(0, 1)
    isotropic_noise: float = 0.1
    num_queries: int = 200
    history: int = 50  # seen items excluded per query user
    k: int = 100
    batch: int = 64
    batch_rounds: int = 3  # passes over the queries at batch 64, the first also collects recall
    brute_force_single: int = 50  # users timed one by one for brute force (each reads the whole table)
    hnsw: FaissConfig = FaissConfig(kind="hnsw", hnsw_m=16, ef_construction=40)
    ef_search: tuple[int, ...] = (128, 256, 512)
    ivf: FaissConfig = FaissConfig(kind="ivf", nlist=1024)
    nprobe: tuple[int, ...] = (16, 32, 64)
    ivf_time_limit_s: float = 400.0  # build IVF (~1-1.5 min here) only if the run so far took less
    chunk_size: int = DEFAULT_CHUNK
    threads: int = 0  # 0 = all cores, for torch and FAISS alike
    seed: int = 0
    out_dir: Path = RESULTS_DIR


QUICK = dict(num_items=200_000, batch_rounds=2)


# ---- data -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Catalogue:
    table: np.ndarray  # (N+1, D) float32, row 0 = padding
    users: np.ndarray  # (Q, D) float32
    exclude: np.ndarray  # (Q, history) int64


def make_catalogue(cfg: RetrievalBenchConfig) -> Catalogue:
    rng = np.random.default_rng(cfg.seed)
    centres = rng.standard_normal((cfg.num_clusters, cfg.latent_dim), dtype=np.float32)
    basis = rng.standard_normal((cfg.latent_dim, cfg.dim), dtype=np.float32) / np.sqrt(cfg.latent_dim)

    def draw(count: int) -> np.ndarray:
        latent = centres[rng.integers(0, cfg.num_clusters, count)]
        latent += cfg.cluster_spread * rng.standard_normal((count, cfg.latent_dim), dtype=np.float32)
        x = latent @ basis + cfg.isotropic_noise * rng.standard_normal((count, cfg.dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    table = np.empty((cfg.num_items + 1, cfg.dim), dtype=np.float32)
    table[0] = 0
    for start in range(1, cfg.num_items + 1, 100_000):  # bounded temporaries
        stop = min(start + 100_000, cfg.num_items + 1)
        table[start:stop] = draw(stop - start)
    users = draw(cfg.num_queries)
    exclude = rng.integers(1, cfg.num_items + 1, (cfg.num_queries, cfg.history), dtype=np.int64)
    return Catalogue(table, users, exclude)


# ---- measuring --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    method: str
    params: str
    build_s: float | None
    recall: float
    single: Timing  # one query per call
    batched: Timing  # `batch` queries per call


def measure_search(
    search: Search, data: Catalogue, cfg: RetrievalBenchConfig, single_queries: int | None = None
) -> tuple[np.ndarray, Timing, Timing]:
    """Ids of every user at batch `cfg.batch` (for recall), latency at batch `cfg.batch` (`cfg.batch_rounds`
    passes over the full batches, the first pass being the recall one, minus its first, untimed call) and
    at batch 1 (the first `single_queries` users, default all, after 5 warm-up calls)."""
    q, b = cfg.num_queries, cfg.batch

    def timed(start: int, stop: int) -> tuple[np.ndarray, float]:
        began = time.perf_counter()
        out = search(data.users[start:stop], data.exclude[start:stop])
        return out, time.perf_counter() - began

    ids, batched = [], []
    for round_ in range(cfg.batch_rounds):
        for start in range(0, q, b):
            out, elapsed = timed(start, min(start + b, q))
            if round_ == 0:
                ids.append(out)
            if start + b <= q and (round_, start) != (0, 0):
                batched.append(elapsed)
    for i in range(min(5, q)):
        timed(i, i + 1)
    single = [timed(i, i + 1)[1] for i in range(min(q, single_queries or q))]
    return np.concatenate(ids), summarize(single), summarize(batched or [float("nan")])


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, e)) / len(e) for a, e in zip(approx, exact, strict=True)]))


def brute_force(table: torch.Tensor, cfg: RetrievalBenchConfig) -> Search:
    def search(users: np.ndarray, exclude: np.ndarray) -> np.ndarray:
        ids, _ = top_k(torch.from_numpy(users), table, cfg.k, torch.from_numpy(exclude), cfg.chunk_size)
        return ids.numpy()

    return search


def approximate(index: Any, cfg: RetrievalBenchConfig) -> Search:
    def search(users: np.ndarray, exclude: np.ndarray) -> np.ndarray:
        return faiss_top_k(index, users, cfg.k, exclude)[0]

    return search


def read_gbps(table: torch.Tensor) -> float:
    """Rate at which torch streams the table from memory: the batch-1 brute-force floor."""
    t = time_call(lambda: table.sum(), warmup=1, repeats=5)
    return table.numel() * table.element_size() / t.median_s / 1e9


def faiss_results(
    name: str,
    config: FaissConfig,
    sweep: tuple[int, ...],
    set_param: Callable[[Any, int], None],
    label: str,
    data: Catalogue,
    exact: np.ndarray,
    cfg: RetrievalBenchConfig,
) -> list[Result]:
    start = time.perf_counter()
    index = build_faiss_index(data.table, config)
    build_s = time.perf_counter() - start
    print(f"{name} build {build_s:.1f} s ({config})", flush=True)
    out = []
    for value in sweep:
        set_param(index, value)
        ids, single, batched = measure_search(approximate(index, cfg), data, cfg)
        result = Result(name, f"{label}={value}", build_s, recall_at_k(ids, exact), single, batched)
        print(
            f"  {result.params}: recall@{cfg.k} {result.recall:.4f}, batch 1 {single.median_ms:.2f} ms",
            flush=True,
        )
        out.append(result)
    del index
    return out


def set_ef_search(index: Any, value: int) -> None:
    graph: Any = faiss.downcast_index(index.index)
    graph.hnsw.efSearch = value


def set_nprobe(index: Any, value: int) -> None:
    faiss.extract_index_ivf(index).nprobe = value


# ---- reporting --------------------------------------------------------------------------------------------

HEADERS = [
    "method",
    "params",
    "build s",
    "recall@100",
    "b1 median ms",
    "b1 p95 ms",
    "b64 median ms",
    "b64 p95 ms",
    "b64 ms/query",
]


def table_rows(results: Sequence[Result], batch: int) -> list[list[object]]:
    return [
        [
            r.method,
            r.params,
            "-" if r.build_s is None else r.build_s,
            r.recall,
            r.single.median_ms,
            r.single.percentile(95) * 1e3,
            r.batched.median_ms,
            r.batched.percentile(95) * 1e3,
            r.batched.median_ms / batch,
        ]
        for r in results
    ]


def plot(results: Sequence[Result], path: Path, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method in dict.fromkeys(r.method for r in results):
        mine = [r for r in results if r.method == method]
        ax.plot([r.single.median_ms for r in mine], [r.recall for r in mine], "o-", label=method)
        for r in mine:
            ax.annotate(
                r.params,
                (r.single.median_ms, r.recall),
                fontsize=7,
                xytext=(3, -9),
                textcoords="offset points",
            )
    ax.axhline(0.95, color="grey", lw=0.8, ls=":")
    ax.set(xscale="log", xlabel="median latency at batch 1 (ms)", ylabel=f"recall@{k} vs brute force")
    ax.set_title("Retrieval over the catalogue: recall vs latency (dotted: 0.95 target)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: RetrievalBenchConfig, command: str) -> None:
    began = time.perf_counter()
    start = start_run(cfg, cfg.threads)
    threads = start.threads
    faiss.omp_set_num_threads(threads)
    data = make_catalogue(cfg)
    table = torch.from_numpy(data.table)  # shares memory with the numpy table
    print(f"catalogue {data.table.shape} in {time.perf_counter() - began:.1f} s", flush=True)

    with torch.inference_mode():
        peak = matmul_peak_gflops(repeats=3)
        gbps = read_gbps(table)
        exact, single, batched = measure_search(brute_force(table, cfg), data, cfg, cfg.brute_force_single)
    results = [Result("brute force", f"torch, chunk {cfg.chunk_size}", None, 1.0, single, batched)]
    print(
        f"brute force: batch 1 {single.median_ms:.1f} ms, batch {cfg.batch} {batched.median_ms:.1f} ms",
        flush=True,
    )

    results += faiss_results(
        "FAISS HNSW", cfg.hnsw, cfg.ef_search, set_ef_search, "efSearch", data, exact, cfg
    )
    ivf_note = ""
    if time.perf_counter() - began < cfg.ivf_time_limit_s:
        results += faiss_results("FAISS IVF", cfg.ivf, cfg.nprobe, set_nprobe, "nprobe", data, exact, cfg)
    else:
        ivf_note = f"IVF skipped: the run had taken over {cfg.ivf_time_limit_s:.0f} s before it."
        print(ivf_note)

    body = table_rows(results, cfg.batch)
    print_table(
        f"Top-{cfg.k} over {cfg.num_items:,} items, d={cfg.dim}, {cfg.num_queries} users", HEADERS, body
    )

    n, d, b = cfg.num_items, cfg.dim, cfg.batch
    table_bytes = n * d * 4
    floors = [
        [
            "brute force, batch 1",
            2 * n * d / 1e9,
            table_bytes / 2**20,
            table_bytes / (gbps * 1e9) * 1e3,
            "memory: table bytes / read rate",
            results[0].single.median_ms,
        ],
        [
            f"brute force, batch {b}",
            2 * b * n * d / 1e9,
            table_bytes / 2**20,
            2 * b * n * d / (peak * 1e9) * 1e3,
            "compute: FLOPs / matmul rate",
            results[0].batched.median_ms,
        ],
    ]
    floor_headers = ["path", "GFLOP", "MiB read", "floor ms", "bound", "measured median ms"]
    print_table("Brute force against its floor", floor_headers, floors)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    elapsed = time.perf_counter() - began
    best = [r for r in results if r.method != "brute force" and r.recall >= 0.95]
    fastest = min(best, key=lambda r: r.single.median_ms) if best else None
    target = (
        f"recall@{cfg.k} >= 0.95 (target) reached by {len(best)} of {len(results) - 1} FAISS settings; fastest: "
        f"{fastest.method} {fastest.params}, recall {fastest.recall:.3f}, {fastest.single.median_ms:.2f} ms at batch 1 "
        f"vs {results[0].single.median_ms:.1f} ms brute force"
        if fastest
        else f"no FAISS setting reached recall@{cfg.k} >= 0.95 (target)"
    )
    print(target)

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    image = cfg.out_dir / "retrieval.png"
    plot(results, image, cfg.k)
    notes = [
        target,
        f"recall@{cfg.k} = |FAISS ids ∩ brute-force ids| / {cfg.k}, averaged over {cfg.num_queries} users; both "
        f"exclude the same {cfg.history} seen items per user (FAISS over-fetches k + {cfg.history}, then filters).",
        f"batch 1: each of the {cfg.num_queries} users (brute force: the first {cfg.brute_force_single}) timed on "
        f"its own after 5 warm-up calls; batch {b}: every full batch of {b} in {cfg.batch_rounds} passes over the "
        f"users, less the first call; 'ms/query' = batch median / {b}.",
        f"fp32 matmul {peak:.1f} GFLOP/s and table read {gbps:.1f} GB/s measured here, {threads} threads "
        "(torch and FAISS).",
        f"HNSW built with M={cfg.hnsw.hnsw_m}, efConstruction={cfg.hnsw.ef_construction} to keep the run short "
        "on 2 shared cores; FaissConfig's defaults (M=32, efConstruction=80) build a better graph ~1.5x slower (measured on 100k items). "
        "IVF: IVFFlat, k-means on faiss's default sample (256 points per list).",
        f"data: {cfg.num_clusters}-cluster Gaussian mixture in {cfg.latent_dim}-d, random map to {d}-d, "
        f"isotropic noise {cfg.isotropic_noise}, L2-normalised; seed {cfg.seed}.",
        f"peak RSS {peak_rss:.2f} GiB; total run {elapsed:.0f} s.",
        *([ivf_note] if ivf_note else []),
        *start.notes,
        f"benchmark config: {dataclasses.replace(cfg, out_dir=Path('benchmarks/results'))}",
    ]
    write_markdown(
        cfg.out_dir / "retrieval.md",
        f"Top-{cfg.k} retrieval over {cfg.num_items:,} items: brute force vs FAISS",
        command,
        HEADERS,
        body,
        notes=notes,
        sections=[Section("Brute force against its floor (count first)", floor_headers, floors)],
        image=image,
        machine=start.report_machine,
    )
    print(f"in {elapsed:.0f} s")


main = micro_cli(__doc__, RetrievalBenchConfig, QUICK, run,
                 quick_help="200k items instead of 1M, fewer batch passes",
                 threads_help="torch and FAISS threads (default: all cores)")

if __name__ == "__main__":
    main()
