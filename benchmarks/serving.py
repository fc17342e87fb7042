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
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from genrec.args import config_from_args
from genrec.benchmarks.batching import batching_ceiling
from genrec.benchmarks.common import REPO_ROOT, RESULTS_DIR, command_line
from genrec.benchmarks.in_process import Overhead, triton_vs_in_process
from genrec.benchmarks.locust_runner import LocustResult, run_locust
from genrec.benchmarks.perf_analyzer import Target, sweep
from genrec.benchmarks.servers import (
    REF_OFF,
    REF_ON,
    SMALL_ONNX,
    SMALL_TORCH,
    Served,
    build,
    make_checkpoint,
    running_servers,
    warm_up,
)
from genrec.benchmarks.serving_config import QUICK, ServingBenchConfig
from genrec.benchmarks.serving_data import (
    History,
    composing_entries,
    length_summary,
    ml100k_histories,
    recommend_entry,
    write_input_data,
)
from genrec.benchmarks.serving_report import load_summary, report

# ---- the benchmark ----------------------------------------------------------------------------------------


def run(cfg: ServingBenchConfig, command: str) -> int:
    started = time.monotonic()
    load_start = load_summary()
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
    parser.add_argument("--checkpoint", dest="small_checkpoint", type=Path,
                        help="the small model's checkpoint (default: train 'paper')")
    parser.add_argument("--reference-checkpoint", type=Path, help="the reference-size checkpoint")
    parser.add_argument(
        "--untrained-reference",
        action="store_true",
        help="make a missing reference checkpoint from untrained weights instead of 1 epoch",
    )
    parser.add_argument("--retrain", action="store_true", help="make the checkpoints again")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the .md, .png and raw/ go")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "runs" / "bench",
                        help="checkpoints and repositories")
    args = parser.parse_args(argv)
    cfg = config_from_args(ServingBenchConfig, args)
    if args.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    if args.untrained_reference:
        cfg = dataclasses.replace(cfg, reference_weights="untrained")
    command = command_line() if argv is None else f"python -m genrec.benchmarks.serving {' '.join(argv)}"
    return run(cfg, command)


if __name__ == "__main__":
    sys.exit(main())
