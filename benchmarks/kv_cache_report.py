"""The K/V-cache benchmark's main table and plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # kv_cache imports this module
    from genrec.benchmarks.kv_cache import Row


HEADERS = [
    "L",
    "C",
    "cached ms",
    "cached IQR ms",
    "no-cache ms",
    "no-cache run on",
    "speed-up",
    "FLOP ratio",
    "cached MFLOP",
    "no-cache GFLOP",
    "cached GFLOP/s",
    "no-cache GFLOP/s",
]
PREFILL_HEADERS = ["L", "prefill ms", "IQR ms", "MFLOP", "GFLOP/s"]
INCREMENTAL_HEADERS = [
    "history",
    "threads",
    "incremental ms",
    "IQR ms",
    "full prefill ms",
    "IQR ms",
    "speed-up",
    "FLOP ratio",
    "incremental MFLOP",
    "full MFLOP",
    "incremental GFLOP/s",
    "full GFLOP/s",
]


def table_rows(rows: Sequence[Row]) -> list[list[object]]:
    out: list[list[object]] = []
    for r in rows:
        extrapolated = r.nocache_measured < r.num_candidates
        run_on = f"{r.nocache_measured} of {r.num_candidates}" + (" (extrap.)" if extrapolated else "")
        out.append(
            [
                r.length,
                r.num_candidates,
                r.cached.median_ms,
                r.cached.iqr_ms,
                r.nocache_s * 1e3,
                run_on,
                r.speedup,
                r.nocache_flops / r.cached_flops,
                r.cached_flops / 1e6,
                r.nocache_flops / 1e9,
                r.cached_gflops,
                r.nocache_flops / r.nocache_s / 1e9,
            ]
        )
    return out


def plot(rows: Sequence[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for length in sorted({r.length for r in rows}):
        mine = [r for r in rows if r.length == length]
        cs = [r.num_candidates for r in mine]
        left.plot(cs, [r.speedup for r in mine], "o-", label=f"L={length}")
        line = right.plot(cs, [r.cached.median_ms for r in mine], "o-", label=f"cached, L={length}")[0]
        right.plot(
            cs,
            [r.nocache_s * 1e3 for r in mine],
            "s--",
            color=line.get_color(),
            label=f"no-cache, L={length}",
        )
    left.axhline(20, color="grey", lw=0.8, ls=":")
    left.set(xscale="log", yscale="log", xlabel="candidates C", ylabel="speed-up (no-cache / cached)")
    left.set_title("KV-cache speed-up (dotted: 20x target)")
    right.set(xscale="log", yscale="log", xlabel="candidates C", ylabel="median ms per request (1 user)")
    right.set_title("Scoring time")
    left.legend()
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
