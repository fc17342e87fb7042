"""The serving benchmark's tables, plot and markdown report."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from genrec.benchmarks.batching import HEADERS as BATCHING_HEADERS
from genrec.benchmarks.common import (
    Section,
    Timing,
    print_table,
    write_markdown,
)
from genrec.benchmarks.in_process import Overhead
from genrec.benchmarks.locust_runner import LOCUST_GRACE_S, LocustResult
from genrec.benchmarks.perf_analyzer import Target, perf_analyzer_args
from genrec.benchmarks.servers import REF_OFF, REF_ON, SMALL_ONNX, SMALL_TORCH, Checkpoint, shown
from genrec.benchmarks.serving_config import ServingBenchConfig


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
        f"SHARED, NOISY machine: load average {load_start} at the start, {load_summary()} at the end; other "
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
    print(f"in {elapsed / 60:.1f} min")


def load_summary() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} cores"
