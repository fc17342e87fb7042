"""HSTU vs SASRec on MovieLens-100K: same split, budget and protocol, several seeds, one run.

    python -m genrec.benchmarks.quality            # or: make quality

Writes benchmarks/results/quality_ml100k.md (mean ± std over seeds, full-ranking and sampled protocols, and
the two-stage pipeline: retrieve 100, re-rank with the cached-K/V scorer) and quality_ml100k.png.
Runs train ``--jobs`` at a time in worker processes (default 2, one torch thread each on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from genrec.benchmarks.common import RESULTS_DIR, git_revision, machine_description  # noqa: E402
from genrec.training.metrics import EvalConfig  # noqa: E402
from genrec.training.prepare import DataConfig, run_training  # noqa: E402
from genrec.training.trainer import TrainConfig  # noqa: E402

COLUMNS = ("HR@1", "HR@10", "HR@50", "HR@200", "NDCG@10", "NDCG@200", "MRR")
console = Console()


Stats = dict[str, tuple[float, float]]  # metric -> (mean, std) over seeds


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]], protocol: str) -> Stats:
    return {c: mean_std([r[protocol][c] for r in runs]) for c in COLUMNS}


def train_one(data: DataConfig, config: TrainConfig, threads: int) -> dict[str, Any]:
    """One (model, seed) run in a worker process with its own torch thread count."""
    import torch

    torch.set_num_threads(threads)
    return run_training(data, config)


def table_markdown(rows: dict[str, Stats]) -> list[str]:
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, stats in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in stats.values()) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", choices=["HSTU", "SASRec"], default=["HSTU", "SASRec"])
    parser.add_argument("--epochs", type=int, default=30, help="training budget per model and seed")
    parser.add_argument("--batch-size", type=int, default=32, help="ML-100K has 943 users: 30 steps per epoch")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once, each on cpu_count / jobs threads")
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--max-minutes", type=float, default=None, help="optional wall-clock cap per run")
    parser.add_argument("--workdir", type=Path, default=Path("runs/quality"))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "quality_ml100k.md")
    args = parser.parse_args(argv)
    started = time.monotonic()
    data = DataConfig()
    configs = {
        (name, seed): TrainConfig(
            model=name.lower(),
            seed=seed,
            epochs=args.epochs,
            batch_size=args.batch_size,
            patience=args.patience,
            max_minutes=args.max_minutes,
            out=args.workdir / f"{name.lower()}_seed{seed}",
            progress=False,
            eval=EvalConfig(),
        )
        for name in args.models  # HSTU's runs are the longest: started first, the two workers finish together
        for seed in args.seeds
    }
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    console.print(f"{len(configs)} runs, {args.jobs} at a time with {threads} torch thread(s) each")
    # spawn: fresh workers, so no torch thread pool is inherited across fork
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {key: pool.submit(train_one, data, config, threads) for key, config in configs.items()}
        results = {}
        for (name, seed), future in futures.items():
            results[name, seed] = future.result()
            console.print(f"[bold]{name} seed {seed}[/] done at {(time.monotonic() - started) / 60:.1f} min: "
                          f"test HR@10 {results[name, seed]['full']['HR@10']:.4f}")
    runs = {name: [results[name, seed] for seed in args.seeds] for name in args.models}
    wall = time.monotonic() - started

    full = {name: summarise(r, "full") for name, r in runs.items()}
    sampled = {name: summarise(r, "sampled") for name, r in runs.items()}
    pipeline, served = {}, {}
    if "HSTU" in runs:
        pipeline = {
            "HSTU retrieval only": full["HSTU"],
            "HSTU two-stage (retrieve 100, re-rank)": summarise(runs["HSTU"], "two_stage"),
        }
        served = {
            "HSTU retrieval only": summarise(runs["HSTU"], "served_retrieval"),
            "HSTU two-stage (retrieve 100, re-rank)": summarise(runs["HSTU"], "served_two_stage"),
        }
    tables = (("full ranking", full), ("sampled (100 negatives)", sampled), ("pipeline", pipeline),
              ("pipeline as served (history excluded)", served))
    for title, rows in tables:
        table = Table(title=f"MovieLens-100K, {title}, mean ± std over seeds {args.seeds}")
        table.add_column("model")
        for column in COLUMNS:
            table.add_column(column, justify="right")
        for name, stats in rows.items():
            table.add_row(name, *(f"{m:.4f}±{s:.4f}" for m, s in stats.values()))
        console.print(table)

    command = "python -m genrec.benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:])
    first = next(iter(runs.values()))[0]["protocol"]
    epochs = {name: [r["epochs_run"] for r in rs] for name, rs in runs.items()}
    weights = "per seed " + ", ".join(f"{r['ranker_weight']:g}" for r in runs.get("HSTU", []))
    lines = [
        "# Quality on MovieLens-100K: " + " vs ".join(args.models),
        "",
        f"- command: `{command.strip()}`",
        f"- revision: {git_revision()}; wall time: {wall / 60:.1f} min; machine: {machine_description()}",
        f"- split: leave-one-out (last event = test, second-to-last = validation), {len(args.seeds)} seeds "
        f"{args.seeds}; mean ± sample std over seeds",
        f"- budget per model and seed: at most {args.epochs} epochs of batch {args.batch_size}"
        + (f" and {args.max_minutes} min" if args.max_minutes is not None else "")
        + f", early stopping on validation NDCG@10 (patience {args.patience}); epochs run: "
        f"{epochs}; {args.jobs} runs at a time",
        "- sizes: the HSTU paper's MovieLens setting for both (d=50, 2 layers, 1 head, length 200, dropout 0.2)",
        "",
        f"## Full ranking ({first['full']})",
        "",
        *table_markdown(full),
        "",
        f"## Sampled ({first['sampled']}, the SASRec paper's protocol)",
        "",
        *table_markdown(sampled),
        "",
        "## Two-stage pipeline vs retrieval alone, full ranking",
        "",
        "Retrieve the top 100 by the user embedding, re-rank them with the cached-K/V scorer (the retrieval logit "
        "plus the ranking head's correction, weighted by one number chosen on the validation events: "
        f"{weights}). A target outside the retrieved 100 counts as a miss.",
        "",
        "As `recommend` serves it, the user's history is excluded from retrieval (both rows):",
        "",
        *table_markdown(served),
        "",
        f"Under the HSTU paper's protocol ({first['full']}):",
        "",
        *table_markdown(pipeline),
        "",
        f"![HR@10 and NDCG@10]({args.out.with_suffix('.png').name})",
        "",
        f"Per-seed metrics: `{args.out.with_suffix('.json').name}`.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(runs, indent=2))
    _plot(full, served, args.out.with_suffix(".png"))
    console.print(f"wrote {args.out} ({wall / 60:.1f} min)")
    return 0


def _plot(models: dict[str, Stats], pipeline: dict[str, Stats], path: Path) -> None:
    """Left: the models under the paper's protocol; right: the served pipeline vs retrieval alone."""
    panels = [(models, "HSTU vs SASRec (history not excluded)")]
    if pipeline:
        panels.append((pipeline, "HSTU as served (history excluded)"))
    metrics = ("HR@10", "NDCG@10", "MRR")
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.5), squeeze=False)
    for ax, (rows, title) in zip(axes[0], panels, strict=True):
        width = 0.8 / len(rows)
        for i, (name, stats) in enumerate(rows.items()):
            xs = [j + i * width for j in range(len(metrics))]
            ax.bar(xs, [stats[m][0] for m in metrics], width, yerr=[stats[m][1] for m in metrics], capsize=3,
                   label=name)
        ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(metrics))], metrics)
        ax.set_ylabel("test, full ranking, mean ± std over seeds")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("MovieLens-100K")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
