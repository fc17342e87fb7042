"""Human-readable metric tables."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table

LOG_WIDTH = 200  # not a terminal (a log file, a pipe): rich would wrap and truncate at 80 columns


def make_console(stderr: bool = False) -> Console:
    """A rich console that keeps its terminal's width, and lines whole when the output is not a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else LOG_WIDTH)


COLUMNS = ("HR@1", "HR@10", "HR@50", "HR@200", "NDCG@10", "NDCG@200", "MRR")


def print_metrics(metrics: dict[str, Any]) -> None:
    """One row per protocol present in `metrics` (full, sampled and, for HSTU, the two-stage pipeline under each)."""
    table = Table(title="test metrics (leave-one-out)")
    table.add_column("protocol")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    for name in ("full", "sampled", "two_stage", "two_stage_sampled"):
        if name in metrics:
            table.add_row(name, *(f"{metrics[name][c]:.4f}" for c in COLUMNS))
    console = make_console()
    console.print(table)
    for name, text in metrics.get("protocol", {}).items():
        console.print(f"  {name}: {text}")
    if "two_stage" in metrics:
        console.print(f"  two_stage: retrieve top-{metrics['two_stage']['retrieve_k']}, re-rank with the scorer "
                      f"(its correction weighted {metrics.get('ranker_weight', 1.0):g}, chosen on validation)")
