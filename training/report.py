"""Human-readable metric tables."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

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
    console = Console()
    console.print(table)
    for name, text in metrics.get("protocol", {}).items():
        console.print(f"  {name}: {text}")
    if "two_stage" in metrics:
        console.print(f"  two_stage: retrieve top-{metrics['two_stage']['retrieve_k']}, re-rank with the scorer "
                      f"(its correction weighted {metrics.get('ranker_weight', 1.0):g}, chosen on validation)")
