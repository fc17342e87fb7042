"""What every benchmark shares: timing with warm-up, the machine and revision, tables, markdown reports."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
# Environment that changes how the numeric libraries thread, so it belongs in a report's command line.
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
)


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the timed repeats (never the warm-up calls)."""

    median_s: float
    p25: float
    p75: float
    samples: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3

    @property
    def iqr_ms(self) -> float:
        return (self.p75 - self.p25) * 1e3

    def percentile(self, q: float) -> float:
        """q in [0, 100], linear interpolation between samples."""
        return percentile(self.samples, q)


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("percentile of no samples")
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def time_call(
    fn: Callable[[], object],
    warmup: int = 2,
    repeats: int = 7,
    min_seconds: float = 0.0,
    max_repeats: int = 1000,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then at least ``repeats`` timed calls, continuing (up to
    ``max_repeats``) until ``min_seconds`` of timed work have accumulated. Median and quartiles, because a
    shared machine adds one-sided noise that a mean would smear over every result."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    total = 0.0
    while len(samples) < repeats or (total < min_seconds and len(samples) < max_repeats):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        samples.append(elapsed)
        total += elapsed
    return summarize(samples)


def time_interleaved(
    fns: Sequence[Callable[[], object]],
    warmup: int = 2,
    repeats: int = 7,
    min_seconds: float = 0.0,
    calls_per_round: Sequence[int] | None = None,
) -> list[Timing]:
    """Time several calls round-robin, so that they see the same background load: on a shared machine this
    keeps their *ratio* honest even when the absolute times drift. Each round makes ``calls_per_round[i]``
    timed calls of ``fns[i]`` (default 1 each: give a fast call more, so its median rests on more samples
    spread over the same period). Runs at least ``repeats`` rounds and until they add up to ``min_seconds``."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    calls = list(calls_per_round) if calls_per_round is not None else [1] * len(fns)
    if len(calls) != len(fns) or min(calls, default=1) < 1:
        raise ValueError(f"calls_per_round {calls} must give >= 1 call for each of the {len(fns)} functions")
    for fn in fns:
        for _ in range(warmup):
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    total, rounds = 0.0, 0
    while rounds < repeats or total < min_seconds:
        for fn, mine, count in zip(fns, samples, calls, strict=True):
            for _ in range(count):
                start = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - start
                mine.append(elapsed)
                total += elapsed
        rounds += 1
    return [summarize(mine) for mine in samples]


def summarize(samples: Sequence[float]) -> Timing:
    """Median and quartiles of samples in seconds."""
    return Timing(
        median_s=statistics.median(samples),
        p25=percentile(samples, 25),
        p75=percentile(samples, 75),
        samples=tuple(samples),
    )


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 ``torch.matmul`` rate of an n x n product on torch's current threads: the practical compute
    ceiling to hold achieved GFLOP/s against."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    timing = time_call(lambda: a @ b, warmup=2, repeats=repeats)
    return 2 * n**3 / timing.median_s / 1e9


def git_revision() -> str:
    """Short hash of HEAD, with ``+dirty`` when the working tree has uncommitted changes (the results folder
    aside: a benchmark's own outputs, written before its report, do not make the code it ran dirty)."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
             f":(exclude){RESULTS_DIR.relative_to(REPO_ROOT)}"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    """1-minute load average: on a shared machine, how many runnable threads compete for the cores."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def oversubscription_warning() -> str | None:
    """A warning when other work already fills the cores and OpenMP threads would spin-wait.

    With libgomp's default (active) waiting, every parallel region of a multi-threaded op waits for its
    slowest thread, which on an oversubscribed machine means a scheduler time slice: measured here, a 0.1 ms
    FAISS query took 20 ms on 2 threads. ``OMP_WAIT_POLICY=PASSIVE`` (read when torch/FAISS load, so it must
    be set in the shell) or ``--threads 1`` avoids it.
    """
    load, cores = load_average(), os.cpu_count() or 1
    if load is None or load < cores or os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        return None
    return (
        f"load average {load:.1f} on {cores} cores: other jobs fill this machine, and multi-threaded ops will "
        "wait for descheduled threads. Set OMP_WAIT_POLICY=PASSIVE in the shell, or run with --threads 1."
    )


@dataclass(frozen=True)
class RunStart:
    """How a benchmark began: its thread count, and the machine as it was then (its load is the one that
    mattered)."""

    threads: int
    machine: str
    warning: str | None  # oversubscription_warning() at the start

    @property
    def notes(self) -> list[str]:
        return [f"measured under load: {self.warning}"] if self.warning else []

    @property
    def report_machine(self) -> str:
        return f"{self.machine} (at start)"


def start_run(config: object, threads: int = 0, **described: object) -> RunStart:
    """What a single-process benchmark does first: torch on `threads` threads (0: every core), then its config,
    anything else `described` and the machine printed, and a warning when other work already fills the cores."""
    import torch

    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    start = RunStart(threads, machine_description(), oversubscription_warning())
    lines = [f"benchmark config: {config}", *(f"{key.replace('_', ' ')}: {value}" for key, value in described.items())]
    print("\n".join([*lines, f"machine: {start.machine}"]), flush=True)
    if start.warning:
        print(f"WARNING: {start.warning}", flush=True)
    return start


def machine_description() -> str:
    """One line: CPU model, cores, memory, load at the time, OS, Python and torch versions."""
    parts = [f"{cpu_model()}", f"{os.cpu_count()} cores"]
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        parts.append(f"{pages / 2**30:.0f} GiB RAM")
    except (ValueError, OSError, AttributeError):
        pass
    load = load_average()
    if load is not None:
        parts.append(f"load average {load:.1f}")
    parts.append(f"{platform.system()} {platform.release()}")
    parts.append(f"Python {platform.python_version()}")
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except ImportError:
        pass
    return ", ".join(parts)


def command_line() -> str:
    """How this benchmark was invoked, as a copy-pasteable ``python -m`` line."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    env = [f"{name}={os.environ[name]}" for name in THREAD_ENV if name in os.environ]
    return " ".join([*env, program, *sys.argv[1:]])


def fmt(value: object) -> str:
    """Compact cell text: floats to 3 significant digits (more before the point), everything else as is."""
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if value == 0 or abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    table = RichTable(title=title)
    for header in headers:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(*(fmt(cell) for cell in row))
    Console(width=220).print(table)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class Section:
    """A further titled table (and text) in a report."""

    title: str
    headers: Sequence[str]
    rows: Sequence[Sequence[object]]
    text: str = ""


def write_markdown(
    path: Path,
    title: str,
    command: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    notes: Sequence[str] = (),
    sections: Sequence[Section] = (),
    image: Path | None = None,
    machine: str | None = None,
) -> None:
    """A report: title, how it was produced (command, revision, machine, date), the table, more sections,
    an optional image (linked relative to the report) and notes; prints where it wrote. ``machine``: the
    description taken when the run started (its load average is the one that mattered); default: now."""
    path.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        f"# {title}",
        "",
        f"- command: `{command}`",
        f"- revision: `{git_revision()}`",
        f"- machine: {machine or machine_description()}",
        f"- date: {now}",
        "",
        markdown_table(headers, rows),
        "",
    ]
    for section in sections:
        out += [f"## {section.title}", ""]
        if section.text:
            out += [section.text, ""]
        out += [markdown_table(section.headers, section.rows), ""]
    if image is not None:
        out += [f"![{title}]({os.path.relpath(image, path.parent)})", ""]
    if notes:
        out += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    path.write_text("\n".join(out))
    print(f"wrote {path}" + (f" and {image}" if image is not None else ""))


Config = TypeVar("Config")


def micro_cli(
    doc: str | None,
    config: Callable[..., Config],
    quick: dict[str, Any],
    run: Callable[[Config, str], None],
    quick_help: str,
    threads_help: str,
) -> Callable[[Sequence[str] | None], None]:
    """The ``main(argv)`` of a single-process benchmark: --quick (the config with `quick`'s fields), --out-dir
    and --threads, then ``run(config, command_line())``."""

    def main(argv: Sequence[str] | None = None) -> None:
        parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--quick", action="store_true", help=quick_help)
        parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the .md and .png go")
        parser.add_argument("--threads", type=int, default=0, help=threads_help)
        args = parser.parse_args(argv)
        chosen = config(out_dir=args.out_dir, threads=args.threads)
        if args.quick:
            chosen = dataclasses.replace(chosen, **quick)  # type: ignore[type-var]
        run(chosen, command_line())

    return main
