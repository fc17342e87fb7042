"""HSTU vs SASRec on MovieLens-100K: same split, budget and protocol, several seeds, one run.

    python -m genrec.benchmarks.quality            # or: make quality

Writes benchmarks/results/quality_ml100k.md (mean ± std over seeds, full-ranking and sampled protocols, and
the two-stage pipeline: retrieve 100, re-rank with the cached-K/V scorer) and quality_ml100k.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
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


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]], protocol: str) -> dict[str, tuple[float, float]]:
    return {c: mean_std([r[protocol][c] for r in runs]) for c in COLUMNS}


def table_markdown(rows: dict[str, dict[str, tuple[float, float]]]) -> list[str]:
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
    parser.add_argument("--epochs", type=int, default=15, help="training budget per model and seed")
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--max-minutes", type=float, default=None, help="optional wall-clock cap per run")
    parser.add_argument("--workdir", type=Path, default=Path("runs/quality"))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "quality_ml100k.md")
    args = parser.parse_args(argv)
    started = time.monotonic()
    data = DataConfig()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.models}
    for seed in args.seeds:
        for name in runs:
            config = TrainConfig(
                model=name.lower(),
                seed=seed,
                epochs=args.epochs,
                patience=args.patience,
                max_minutes=args.max_minutes,
                out=args.workdir / f"{name.lower()}_seed{seed}",
                progress=False,
                eval=EvalConfig(),
            )
            console.print(f"[bold]{name} seed {seed}[/]")
            runs[name].append(run_training(data, config))
    wall = time.monotonic() - started

    full = {name: summarise(r, "full") for name, r in runs.items()}
    sampled = {name: summarise(r, "sampled") for name, r in runs.items()}
    pipeline = {}
    if "HSTU" in runs:
        pipeline = {
            "HSTU retrieval only": full["HSTU"],
            "HSTU two-stage (retrieve 100, re-rank)": summarise(runs["HSTU"], "two_stage"),
        }
    for title, rows in (("full ranking", full), ("sampled (100 negatives)", sampled), ("pipeline", pipeline)):
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
    lines = [
        "# Quality on MovieLens-100K: " + " vs ".join(args.models),
        "",
        f"- command: `{command.strip()}`",
        f"- revision: {git_revision()}; wall time: {wall / 60:.1f} min; machine: {machine_description()}",
        f"- split: leave-one-out (last event = test, second-to-last = validation), {len(args.seeds)} seeds "
        f"{args.seeds}; mean ± sample std over seeds",
        f"- budget per model and seed: at most {args.epochs} epochs and {args.max_minutes} min, early stopping on "
        f"validation NDCG@10 (patience {args.patience}); epochs run: {epochs}",
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
        "## Two-stage pipeline (what `recommend` serves) vs retrieval alone, full ranking",
        "",
        "A target outside the retrieved 100 counts as a miss; inside them the scorer's order decides.",
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
    two_stage = {"HSTU two-stage": pipeline["HSTU two-stage (retrieve 100, re-rank)"]} if pipeline else {}
    _plot({**full, **two_stage}, args.out.with_suffix(".png"))
    console.print(f"wrote {args.out} ({wall / 60:.1f} min)")
    return 0


def _plot(rows: dict[str, dict[str, tuple[float, float]]], path: Path) -> None:
    metrics = ("HR@10", "NDCG@10", "MRR")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(rows)
    for i, (name, stats) in enumerate(rows.items()):
        xs = [j + i * width for j in range(len(metrics))]
        ax.bar(
            xs,
            [stats[m][0] for m in metrics],
            width,
            yerr=[stats[m][1] for m in metrics],
            capsize=3,
            label=name,
        )
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(metrics))], metrics)
    ax.set_ylabel("test, full ranking")
    ax.set_title("MovieLens-100K, mean ± std over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
