"""KV-cache ablation: scoring candidates from a cached history vs recomputing the history per candidate.

    python -m genrec.benchmarks.kv_cache [--quick]

Model: ``reference_preset`` (d=128, 4 layers, 8 heads of d_qk = d_v = 16), max_len 1024, eval mode, fp32, one user.

Paths, for a history of L events and C candidates:
  * cached:   ``score_candidates(cache, user, candidates)`` on a prefilled cache (prefill timed separately);
  * no-cache: what a scorer without K/V reuse does: per candidate, one full forward over history + that
    candidate (``forward_with_candidates`` on C copies of the history with one candidate each, in chunks);
  * incremental prefill: one new event on top of a cached history of 1000 vs a full prefill of 1001.

FLOPs are counted from the config (multiply-add = 2 FLOPs), with d = d_model, H heads, layers n:
  token  = 2·d·(2·H·d_v + 2·H·d_qk)  [U,V,Q,K projection]  + 2·H·d_v·d  [output projection]
  pair   = 2·H·d_qk  [q·k]  + 2·H·d_v  [weight·v]            per (query, key) pair the mask allows
  head   = 2·d·d + 2·d·tasks  [rank head]  + 2·d  [retrieval dot product]
  prefill(N new on top of P cached) = n·(N·token + (N·P + N(N+1)/2)·pair)
  cached(L, C)   = C·(n·(token + (L+1)·pair) + head)              a candidate sees L events and itself
  no-cache(L, C) = C·(n·((L+1)·token + (L(L+1)/2 + L+1)·pair) + head)
Only the pairs the mask allows are counted (the model's useful work); the implementation computes the
dense (queries x keys) score matrix and masks it, so it executes up to ~2x the attention FLOPs counted here.
Achieved GFLOP/s = counted FLOPs / median time, beside the machine's measured fp32 matmul rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from genrec.benchmarks.common import (
    RESULTS_DIR,
    Section,
    Timing,
    command_line,
    fmt,
    machine_description,
    print_table,
    time_call,
    write_markdown,
)
from genrec.training.batch import SequenceBatch
from genrec.training.hstu import HSTU, HSTUConfig, KVCache, reference_preset


@dataclass(frozen=True)
class KVBenchConfig:
    lengths: tuple[int, ...] = (50, 200, 1000)
    candidates: tuple[int, ...] = (10, 100, 1000)
    num_items: int = 100_000
    max_len: int = 1024  # >= 1001, so that the incremental prefill 1000 -> 1001 fits
    incremental_history: int = 1000
    warmup: int = 2
    repeats: int = 7
    min_seconds: float = 0.5  # keep repeating fast calls until this much timed work
    nocache_gflop_per_call: float = 6.0  # cap on the no-cache work measured per call (then extrapolated)
    nocache_chunk_elements: int = 2**24  # copies x (L+1)^2 x heads attention scores per no-cache chunk
    seed: int = 0
    out_dir: Path = RESULTS_DIR


QUICK = dict(warmup=1, repeats=3, min_seconds=0.0, nocache_gflop_per_call=2.0)


# ---- counting ---------------------------------------------------------------------------------------------


def token_flops(c: HSTUConfig) -> int:
    h, d = c.num_heads, c.d_model
    return 2 * d * (2 * h * c.d_v + 2 * h * c.d_qk) + 2 * h * c.d_v * d


def pair_flops(c: HSTUConfig) -> int:
    return 2 * c.num_heads * c.d_qk + 2 * c.num_heads * c.d_v


def head_flops(c: HSTUConfig) -> int:
    return 2 * c.d_model * c.d_model + 2 * c.d_model * c.num_tasks + 2 * c.d_model


def prefill_flops(c: HSTUConfig, new: int, cached: int = 0) -> int:
    pairs = new * cached + new * (new + 1) // 2
    return c.num_layers * (new * token_flops(c) + pairs * pair_flops(c))


def cached_score_flops(c: HSTUConfig, length: int, num_candidates: int) -> int:
    per_candidate = c.num_layers * (token_flops(c) + (length + 1) * pair_flops(c)) + head_flops(c)
    return num_candidates * per_candidate


def nocache_score_flops(c: HSTUConfig, length: int, num_candidates: int) -> int:
    pairs = length * (length + 1) // 2 + length + 1
    per_candidate = c.num_layers * ((length + 1) * token_flops(c) + pairs * pair_flops(c)) + head_flops(c)
    return num_candidates * per_candidate


def cache_bytes(c: HSTUConfig, length: int) -> int:
    """fp32 K/V of one history: what the cached path must read per candidate chunk."""
    return 4 * c.num_layers * length * c.num_heads * (c.d_qk + c.d_v)


# ---- inputs -----------------------------------------------------------------------------------------------


def random_history(length: int, num_items: int, generator: torch.Generator) -> SequenceBatch:
    """One user's history (1, L): random items, increasing timestamps one minute to a day apart."""
    items = torch.randint(1, num_items + 1, (1, length), generator=generator)
    gaps = torch.randint(60, 86_400, (1, length), generator=generator)
    timestamps = 1_600_000_000 + gaps.cumsum(dim=1)
    return SequenceBatch(items, timestamps, torch.zeros_like(items), torch.tensor([length]))


def repeat_history(batch: SequenceBatch, copies: int) -> SequenceBatch:
    """(1, L) -> (copies, L), one copy per candidate for the no-cache baseline."""
    return SequenceBatch(
        batch.items.expand(copies, -1).contiguous(),
        batch.timestamps.expand(copies, -1).contiguous(),
        batch.actions.expand(copies, -1).contiguous(),
        batch.lengths.expand(copies).contiguous(),
    )


def slice_history(batch: SequenceBatch, start: int, stop: int) -> SequenceBatch:
    return SequenceBatch(
        batch.items[:, start:stop],
        batch.timestamps[:, start:stop],
        batch.actions[:, start:stop],
        torch.tensor([stop - start]),
    )


# ---- measuring --------------------------------------------------------------------------------------------


def matmul_peak_gflops(cfg: KVBenchConfig, n: int = 2048) -> float:
    """The machine's fp32 matmul rate with all threads: the practical ceiling for these kernels."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    timing = time_call(lambda: a @ b, warmup=2, repeats=max(3, cfg.repeats // 2))
    return 2 * n**3 / timing.median_s / 1e9


@dataclass(frozen=True)
class Row:
    length: int
    num_candidates: int
    cached: Timing
    nocache_s: float  # extrapolated to all C candidates
    nocache_measured: int  # candidates actually run per timed call
    nocache_chunk: int
    cached_flops: int
    nocache_flops: int


def nocache_timer(
    model: HSTU, history: SequenceBatch, cfg: KVBenchConfig
) -> Callable[[int], tuple[Timing, int, int]]:
    """Times the no-cache baseline for m candidates: (timing of the m, m actually run, chunk size)."""
    c = model.config
    length = history.max_len
    chunk = max(1, cfg.nocache_chunk_elements // ((length + 1) ** 2 * c.num_heads))
    memo: dict[tuple[int, int], Timing] = {}
    generator = torch.Generator().manual_seed(cfg.seed + 1)

    def run(num_candidates: int) -> tuple[Timing, int, int]:
        per_candidate = nocache_score_flops(c, length, 1)
        budget = max(1, int(cfg.nocache_gflop_per_call * 1e9 // per_candidate))
        measured = min(num_candidates, budget)
        size = min(chunk, measured)
        measured = math.ceil(measured / size) * size if measured < num_candidates else measured
        if (measured, size) not in memo:
            copies = repeat_history(history, size)
            cands = torch.randint(1, c.num_items + 1, (measured, 1), generator=generator)

            def call() -> None:
                for start in range(0, measured, size):
                    part = cands[start : start + size]
                    batch = copies if part.shape[0] == size else repeat_history(history, part.shape[0])
                    model.forward_with_candidates(batch, part)

            memo[(measured, size)] = time_call(
                call, warmup=1, repeats=max(3, cfg.repeats // 2), min_seconds=cfg.min_seconds
            )
        return memo[(measured, size)], measured, size

    return run


def measure(model: HSTU, cfg: KVBenchConfig) -> tuple[list[Row], list[list[object]]]:
    c = model.config
    generator = torch.Generator().manual_seed(cfg.seed)
    rows: list[Row] = []
    prefill_rows: list[list[object]] = []
    for length in cfg.lengths:
        history = random_history(length, c.num_items, generator)
        prefill = time_call(lambda h=history: model.prefill(h), cfg.warmup, cfg.repeats, cfg.min_seconds)
        flops = prefill_flops(c, length)
        prefill_rows.append(
            [length, prefill.median_ms, prefill.iqr_ms, flops / 1e6, flops / prefill.median_s / 1e9]
        )
        cache, user = model.prefill(history)
        nocache = nocache_timer(model, history, cfg)
        for num_candidates in cfg.candidates:
            cands = torch.randint(1, c.num_items + 1, (1, num_candidates), generator=generator)
            cached = time_call(
                lambda k=cache, u=user, x=cands: model.score_candidates(k, u, x),
                cfg.warmup,
                cfg.repeats,
                cfg.min_seconds,
            )
            nc, measured, chunk = nocache(num_candidates)
            row = Row(
                length,
                num_candidates,
                cached,
                nc.median_s * num_candidates / measured,
                measured,
                chunk,
                cached_score_flops(c, length, num_candidates),
                nocache_score_flops(c, length, num_candidates),
            )
            rows.append(row)
            print(
                f"L={length:5d} C={num_candidates:5d}  cached {cached.median_ms:9.2f} ms  "
                f"no-cache {row.nocache_s * 1e3:10.1f} ms ({measured} of {num_candidates} run)",
                flush=True,
            )
    return rows, prefill_rows


def measure_incremental(model: HSTU, cfg: KVBenchConfig) -> list[object]:
    """One new event on top of a cached history vs a full prefill of history + event."""
    c = model.config
    length = cfg.incremental_history
    generator = torch.Generator().manual_seed(cfg.seed + 2)
    full = random_history(length + 1, c.num_items, generator)
    cache: KVCache = model.prefill(slice_history(full, 0, length))[0]
    event = slice_history(full, length, length + 1)
    incremental = time_call(lambda: model.prefill(event, cache), cfg.warmup, cfg.repeats, cfg.min_seconds)
    from_scratch = time_call(lambda: model.prefill(full), cfg.warmup, cfg.repeats, cfg.min_seconds)
    inc_flops, full_flops = prefill_flops(c, 1, length), prefill_flops(c, length + 1)
    return [
        f"{length} -> {length + 1}",
        incremental.median_ms,
        incremental.iqr_ms,
        from_scratch.median_ms,
        from_scratch.iqr_ms,
        from_scratch.median_s / incremental.median_s,
        full_flops / inc_flops,
        inc_flops / 1e6,
        full_flops / 1e6,
        inc_flops / incremental.median_s / 1e9,
        full_flops / from_scratch.median_s / 1e9,
    ]


# ---- reporting --------------------------------------------------------------------------------------------

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
                r.nocache_s / r.cached.median_s,
                r.nocache_flops / r.cached_flops,
                r.cached_flops / 1e6,
                r.nocache_flops / 1e9,
                r.cached_flops / r.cached.median_s / 1e9,
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
        left.plot(cs, [r.nocache_s / r.cached.median_s for r in mine], "o-", label=f"L={length}")
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


def run(cfg: KVBenchConfig, command: str) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    model_config = reference_preset(num_items=cfg.num_items, max_len=cfg.max_len)
    print(
        f"benchmark config: {cfg}\nmodel config: {model_config}\nmachine: {machine_description()}", flush=True
    )
    model = HSTU(model_config).eval()
    with torch.inference_mode():
        peak = matmul_peak_gflops(cfg)
        print(f"fp32 matmul 2048x2048: {peak:.1f} GFLOP/s", flush=True)
        rows, prefill_rows = measure(model, cfg)
        incremental = measure_incremental(model, cfg)

    body = table_rows(rows)
    print_table(f"KV-cache scoring, 1 user (fp32 matmul peak {peak:.1f} GFLOP/s)", HEADERS, body)
    print_table("Prefill (history -> cache)", PREFILL_HEADERS, prefill_rows)
    print_table("Incremental prefill: one new event", INCREMENTAL_HEADERS, [incremental])

    target = next((r for r in rows if (r.length, r.num_candidates) == (200, 100)), None)
    targets = []
    if target is not None:
        speedup = target.nocache_s / target.cached.median_s
        targets.append(
            f"L=200, C=100 cached speed-up {speedup:.0f}x (target >= 20x: {'met' if speedup >= 20 else 'MISSED'})"
        )
    inc_speedup = float(incremental[5])  # type: ignore[arg-type]
    targets.append(
        f"incremental prefill at L={cfg.incremental_history} speed-up {inc_speedup:.0f}x "
        f"(target >= 50x: {'met' if inc_speedup >= 50 else 'MISSED'})"
    )
    for line in targets:
        print(line)

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    image = cfg.out_dir / "kv_cache.png"
    plot(rows, image)
    max_cache = max(cfg.lengths)
    notes = [
        *targets,
        f"fp32 matmul peak (2048x2048, {torch.get_num_threads()} threads): {peak:.1f} GFLOP/s; "
        "GFLOP/s columns count only the useful FLOPs (see the module docstring for the formulas).",
        "no-cache = for every candidate, one full forward over history + that candidate "
        "(`forward_with_candidates` on copies of the history, one candidate each, in chunks). Where the "
        "'run on' column says 'n of C (extrap.)', only n candidates were run per timed call and the time was "
        "scaled by C/n: every candidate costs the same, so the scaling is linear by construction.",
        f"cached path reads the history's K/V: {fmt(cache_bytes(reference_preset(1, max_len=cfg.max_len), max_cache) / 2**20)} "
        f"MiB at L={max_cache} (fp32), plus the layer weights.",
        f"times are medians of >= {cfg.repeats} timed calls after {cfg.warmup} warm-up calls, "
        "torch.inference_mode(), eval mode, batch = 1 user; IQR = p75 - p25. The machine is shared, so "
        "compare ratios within one run.",
        f"model: {model_config}",
        f"benchmark config: {dataclasses.replace(cfg, out_dir=Path('benchmarks/results'))}",
    ]
    write_markdown(
        cfg.out_dir / "kv_cache.md",
        "KV-cache ablation: cached candidate scoring vs recomputing the history",
        command,
        HEADERS,
        body,
        notes=notes,
        sections=[
            Section("Incremental prefill", INCREMENTAL_HEADERS, [incremental]),
            Section(
                "Prefill (history -> cache), reported separately from scoring", PREFILL_HEADERS, prefill_rows
            ),
        ],
        image=image,
    )
    print(f"wrote {cfg.out_dir / 'kv_cache.md'} and {image}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats and less no-cache work (noisier)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the .md and .png go")
    args = parser.parse_args(argv)
    cfg = KVBenchConfig(out_dir=args.out_dir)
    if args.quick:
        cfg = dataclasses.replace(cfg, **QUICK)  # type: ignore[arg-type]
    run(cfg, command_line())


if __name__ == "__main__":
    main()
