"""The training loop: sampled softmax (+ the ranking objective for HSTU), early stopping, checkpoints, DDP.

Runs on one CPU, one GPU (bf16 autocast), or many processes under ``torchrun`` (DDP; gloo on CPU).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import ctypes
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from genrec.training.batch import SequenceBatch
from genrec.training.checkpoint import CheckpointMeta, save_checkpoint
from genrec.training.embeddings import ItemFeatures
from genrec.training.evaluate import evaluate, evaluate_scorer_sampled, evaluate_two_stage, rerank
from genrec.training.flops import train_step_flops
from genrec.training.hstu import HSTU, HSTUConfig
from genrec.training.losses import (
    LossConfig,
    SeenItems,
    describe_loss,
    high_ratings,
    next_events,
    ranking_loss,
    retrieval_loss,
)
from genrec.training.metrics import EvalConfig, metrics_from_ranks
from genrec.training.popularity import PopularityConfig, popularity_table
from genrec.training.report import make_console
from genrec.training.sasrec import SASRec, SASRecConfig
from genrec.training.sequences import Histories, SequenceData, Split

console = make_console(stderr=True)

PRESETS: dict[str, dict[str, Any]] = {
    # The HSTU paper's MovieLens setting (and SASRec's, which it matches in size).
    "paper": dict(d_model=50, num_layers=2, num_heads=1, max_len=200, dropout=0.2),
    # The serving benchmarks' reference size.
    "reference": dict(d_model=128, num_layers=4, num_heads=8, max_len=512, dropout=0.2),
    # Seconds on a laptop: tests and the demo's smoke runs.
    "tiny": dict(d_model=32, num_layers=2, num_heads=2, max_len=50, dropout=0.1),
}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation defaults are Meta's ML-1M HSTU recipe (see the README's table); the loss default is not."""

    model: str = "hstu"  # hstu | sasrec
    preset: str = "paper"
    max_len: int | None = None  # overrides the preset's
    epochs: int = 101  # at most; early stopping usually ends a run first
    batch_size: int = 128
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = None  # max gradient norm; None = no clipping
    # early stopping on validation NDCG@10 under `eval`: `patience` epochs without a better one, counted only
    # from epoch `min_epochs` on, so a run on sparse data is not ended before it starts learning
    patience: int = 10
    min_epochs: int = 10
    max_minutes: float | None = None  # wall-clock budget for the training loop
    seed: int = 0
    action_dropout: float = 0.1  # hide an event's action so the model also serves callers that send none
    # Validate, keep and serve an exponential moving average of the weights over about this many epochs of
    # optimiser steps (Polyak averaging); None: the raw weights.
    ema_epochs: float | None = None
    loss: LossConfig = field(default_factory=LossConfig)
    popularity: PopularityConfig = field(default_factory=PopularityConfig)  # the HSTU scorer's features
    eval: EvalConfig = field(default_factory=EvalConfig)
    retrieve_k: int = 100  # the two-stage pipeline's retrieval depth
    # Once trained, weigh the ranking head's correction against the retrieval logit on the validation events
    # (fresh events, on which retrieval is not over-confident): one number, so 943 users are plenty.
    calibrate_ranker: bool = True
    device: str = "auto"
    out: Path = Path("runs/hstu")
    resume: bool = False
    progress: bool = True


class WeightAverage:
    """An exponential moving average of a model's parameters over about ``epochs`` epochs of optimiser steps
    (``epochs`` times the epoch's steps, given at each update: the horizon ``h``). Early steps weigh more
    (decay ``(1 + t) / (10 + t)`` until it reaches ``1 - 1 / h``), so the average of the first epochs is not
    the initialisation's. Buffers (tables, features) are not averaged."""

    def __init__(self, model: nn.Module, epochs: float) -> None:
        self.params = [p.detach().clone() for p in model.parameters()]
        self.epochs, self.steps = epochs, 0

    @torch.no_grad()
    def update(self, model: nn.Module, steps_per_epoch: int) -> None:
        self.steps += 1
        horizon = max(self.epochs * steps_per_epoch, 1.0)
        decay = min(1.0 - 1.0 / horizon, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.params, [p.detach() for p in model.parameters()], 1.0 - decay)

    @staticmethod
    def applied_if(average: WeightAverage | None, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """`applied` when there is an average, else nothing."""
        return average.applied(model) if average is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own again after it."""
        own = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in model.parameters()], self.params)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in model.parameters()], own)

    def state_dict(self) -> dict[str, Any]:
        return {"params": self.params, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.params, self.steps = state["params"], state["steps"]


def hstu_config(preset: str, **fields: Any) -> HSTUConfig:
    """A preset's HSTU sizes, its heads splitting d_model evenly, with any field set or overridden."""
    sizes = dict(PRESETS[preset])
    d, heads = sizes["d_model"], sizes["num_heads"]
    return HSTUConfig(**{**sizes, "d_qk": d // heads, "d_v": d // heads, **fields})


def make_model(config: TrainConfig, data: SequenceData) -> HSTU | SASRec:
    preset = dict(PRESETS[config.preset])
    if config.max_len is not None:
        preset["max_len"] = config.max_len
    common = dict(
        num_items=len(data.item_vocab),
        num_actions=data.num_actions,
        num_genres=data.item_genres.shape[1],
        num_years=len(data.year_values),
        temperature=config.loss.temperature,
    )
    model: HSTU | SASRec
    if config.model == "hstu":
        table, extra = None, {}
        if not data.timed:  # an ordered log without time: gaps and recent counts would be invented
            extra = dict(num_time_buckets=0)
        elif config.popularity.enabled:
            table = popularity_table(data.timestamps, data.items, len(data.item_vocab), config.popularity)
            extra = dict(popularity_windows=config.popularity.windows, popularity_buckets=table.num_buckets)
        model = HSTU(hstu_config(config.preset, **common, max_len=preset["max_len"], **extra))
        if model.popularity is not None and table is not None:
            model.popularity.set_table(table)
    elif config.model == "sasrec":
        model = SASRec(SASRecConfig(**common, **preset))
    else:
        raise ValueError(f"unknown model {config.model!r}: expected 'hstu' or 'sasrec'")
    model.items.set_features(ItemFeatures(data.item_genres, data.item_years))
    return model


class TrainStep(nn.Module):
    """The loss as a module, so DistributedDataParallel sees every parameter used in one forward."""

    model: HSTU | SASRec

    def __init__(self, model: HSTU | SASRec, loss: LossConfig, high_rating: Tensor) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.register_buffer("high_rating", high_rating)

    def forward(self, batch: SequenceBatch, generator: torch.Generator) -> dict[str, Tensor]:
        """Each loss term by name ("retrieval", and "ranking" for HSTU); their sum is what is minimised."""
        mask, targets = next_events(batch, self.loss)
        if isinstance(self.model, HSTU):
            user, cache = self.model.encode_with_cache(batch)
        else:
            user = self.model.encode(batch)
        table = self.model.item_table()
        seen = SeenItems(batch.items, mask, batch.earlier) if self.loss.exclude_seen else None
        terms = {"retrieval": retrieval_loss(user[mask], targets, table, self.loss, generator, seen)}
        if isinstance(self.model, HSTU):
            terms["ranking"] = ranking_loss(self.model, batch, user, cache, self.high_rating, self.loss, generator)
        return terms


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if dist.is_initialized() and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def init_distributed() -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1). Returns True if it joined."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def keep_freed_host_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse rather than hand it back to the kernel; True if set.

    A step's largest tensors, the (positions, catalogue) logits and their gradient (43 MB for one ML-100K
    batch, hundreds of MB on larger catalogues), are over glibc's 32 MB mmap ceiling, so each was a fresh
    mapping whose page faults cost more than the arithmetic done on it: an ML-1M-shaped HSTU epoch took
    18.4 s without them, 29.4 s with. The cost: what the process freed stays mapped, up to its peak, which a training
    process reaches again at every step. Linux glibc only; elsewhere nothing changes.
    """
    if sys.platform != "linux":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _lr_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / max(1, warmup))


def train(config: TrainConfig, data: SequenceData, train_set: Histories, valid: Split, test: Split, data_name: str = "") -> dict:
    """Train with early stopping on validation NDCG@10; write the best checkpoint and its test metrics.

    Returns the metrics dict written to ``<out>/checkpoint/metrics.json``.
    """
    joined = init_distributed()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    is_main = rank == 0
    seed_everything(config.seed)
    device = resolve_device(config.device)
    if device.type == "cpu":
        keep_freed_host_memory()
    out = Path(config.out)
    model = make_model(config, data).to(device)
    high_rating = torch.as_tensor(high_ratings(data.action_values, config.loss), dtype=torch.bool)
    # a log without time has every event at 0: its order is all there is, and no events are tied
    loss_config = config.loss if data.timed else dataclasses.replace(config.loss, tied_targets=False)
    step_module: nn.Module = TrainStep(model, loss_config, high_rating).to(device)
    if world > 1:
        step_module = DistributedDataParallel(step_module, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.warmup_steps))
    state_path = out / "trainer_state.pt"
    start_epoch, best, best_epoch, stale = 0, -1.0, -1, 0
    best_state = copy.deepcopy(model.state_dict())
    average = WeightAverage(model, config.ema_epochs) if config.ema_epochs is not None else None
    if config.resume and state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, best_epoch, stale = state["epoch"] + 1, state["best"], state["best_epoch"], state["stale"]
        best_state = state["best_model"]
        if average is not None and state.get("average") is not None:
            average.load_state_dict(state["average"])
        torch.set_rng_state(state["rng"].cpu())
        if is_main:
            console.print(f"resumed from {state_path} at epoch {start_epoch}")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(config), indent=2, default=str))
        console.print(f"[bold]training {config.model}[/] on {device} x{world}: {describe_config(config)}")
    use_amp = device.type == "cuda"
    log_path = out / "metrics.csv"
    if is_main and start_epoch == 0:  # a fresh run does not append to an earlier run's log
        log_path.unlink(missing_ok=True)
    started = time.monotonic()
    epoch = start_epoch - 1
    for epoch in range(start_epoch, config.epochs):
        model.train()
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch * 1009 + rank)
        batches = train_set_batches(train_set, config, epoch)
        if len(batches) < world:
            batches = (batches * world)[:world]
        batches = batches[: len(batches) // world * world][rank::world]  # equal step counts per rank
        losses: list[dict[str, float]] = []
        events, flops, epoch_start = 0, 0, time.monotonic()
        # a bar only on a terminal: in a log file its redraws would be noise
        bar = tqdm(batches, desc=f"epoch {epoch}", disable=not (config.progress and is_main and sys.stderr.isatty()),
                   leave=False)
        for batch in bar:
            events += int(batch.lengths.sum())
            flops += train_step_flops(model.config, config.loss, batch)
            batch = _drop_actions(batch, config.action_dropout, generator).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                terms = step_module(batch, generator)
                loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            if average is not None:
                average.update(model, len(batches))
            # one host sync per step for all the terms
            values = torch.stack([t.detach().float() for t in terms.values()]).tolist()
            losses.append(dict(zip(terms, values, strict=True)))
            bar.set_postfix({name: f"{value:.3f}" for name, value in losses[-1].items()})
        train_seconds = time.monotonic() - epoch_start
        with WeightAverage.applied_if(average, model):
            val = evaluate(model, valid, config.eval)
            score = val["NDCG@10"]
            improved = score > best
            if improved:  # the averaged weights, when averaging: what validation saw is what is kept
                best_state = copy.deepcopy(model.state_dict())
        if improved:
            best, best_epoch, stale = score, epoch, 0
        elif epoch >= config.min_epochs:
            stale += 1
        if is_main:
            term_means = {name: float(np.mean([step[name] for step in losses])) for name in losses[0]}
            row = {"epoch": epoch, "train_loss": sum(term_means.values()),
                   **{f"train_{name}_loss": value for name, value in term_means.items()},
                   "lr": scheduler.get_last_lr()[0],
                   "seconds": round(time.monotonic() - started, 1), "train_seconds": round(train_seconds, 2),
                   "events": events * world, "flops_per_event": flops / max(events, 1),
                   **{f"val_{k}": v for k, v in val.items()}}
            _append_csv(log_path, row)
            terms = "  ".join(f"{name} {value:.4f}" for name, value in term_means.items())
            console.print(
                f"epoch {epoch:3d}  loss {terms}  val HR@10 {val['HR@10']:.4f}  "
                f"NDCG@10 {score:.4f}{'  *' if improved else ''}  {_eta(epoch, start_epoch, started, config)}"
            )
        out_of_time = config.max_minutes is not None and time.monotonic() - started > 60 * config.max_minutes
        stop = torch.tensor([int(stale >= config.patience or out_of_time)], device=device)
        if world > 1:  # every rank stops at the same epoch, or the others would wait forever
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        last = bool(stop.item()) or epoch == config.epochs - 1
        if is_main and (improved or last):
            # Only when it improved or at the end: a killed run resumes from its best epoch, and its best
            # weights so far are a checkpoint `genrec eval` can read (before the end's ranker calibration).
            torch.save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "epoch": epoch, "best": best, "best_epoch": best_epoch, "stale": stale, "best_model": best_state,
                 "average": average.state_dict() if average is not None else None, "rng": torch.get_rng_state()},
                state_path,
            )
            if improved:  # the end overwrites it, calibrated and with its test metrics
                with WeightAverage.applied_if(average, model):
                    save_checkpoint(out / "checkpoint", model, _meta(config, model, data, data_name))
        if stop.item():
            break
    model.load_state_dict(best_state)
    calibrated = isinstance(model, HSTU) and config.calibrate_ranker
    ranker_weight = calibrate_ranker(model, valid, config) if calibrated else 1.0  # type: ignore[arg-type]
    metrics = test_metrics(model, test, config)
    metrics["ranker_weight"] = ranker_weight
    metrics["loss"] = describe_loss(loss_config, len(data.item_vocab))
    metrics["best_epoch"] = best_epoch
    metrics["epochs_run"] = epoch + 1
    metrics["train_seconds"] = round(time.monotonic() - started, 1)
    if is_main:
        save_checkpoint(out / "checkpoint", model, _meta(config, model, data, data_name), metrics)
    if joined:
        dist.destroy_process_group()
    return metrics


def describe_config(config: TrainConfig) -> str:
    """The settings that matter most, then every other one that differs from its default, flattened
    (``loss.kind=full``); all of them are in train_config.json."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in d.items():
            out |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
        return out

    given, default = flat(asdict(config)), flat(asdict(TrainConfig()))
    shown = ["preset", "max_len", "epochs", "batch_size", "lr", "patience", "max_minutes", "loss.kind"]
    changed = [key for key in given if key not in shown and given[key] != default.get(key)]
    return ", ".join(f"{key}={given[key]}" for key in shown + changed)


def _meta(config: TrainConfig, model: HSTU | SASRec, data: SequenceData, data_name: str) -> CheckpointMeta:
    return CheckpointMeta(
        model_config=model.config,
        item_raw_ids=data.item_vocab.raw_ids,
        item_titles=data.item_titles,
        action_values=data.action_values,
        data={"name": data_name, "num_users": len(data.users), "num_events": int(len(data.items)),
              "genre_names": list(data.genre_names)},
        train=asdict(config),
    )


def _eta(epoch: int, start_epoch: int, started: float, config: TrainConfig) -> str:
    """How long the rest may take: the epochs left at this run's mean pace, capped by --max-minutes."""
    elapsed = time.monotonic() - started
    left_s = elapsed / (epoch - start_epoch + 1) * (config.epochs - epoch - 1)
    if config.max_minutes is not None:
        left_s = max(min(left_s, 60 * config.max_minutes - elapsed), 0.0)
    return f"{elapsed / 60:.1f} min, at most {left_s / 60:.1f} min left"


RANKER_WEIGHTS = tuple(i / 20 for i in range(41))  # 0, 0.05, ..., 2


def calibrate_ranker(model: HSTU, held_out: Split, config: TrainConfig) -> float:
    """Scale the ranking head's correction by the weight that gives the served pipeline (history excluded)
    its best NDCG@10 on held-out events; ties go to the smaller weight (0 = retrieval's order). Returns it."""
    served = dataclasses.replace(config.eval, exclude_history=True)
    parts = rerank(model, held_out, served, config.retrieve_k)

    def ndcg(weight: float) -> float:
        return metrics_from_ranks(torch.cat([p.ranks(weight) for p in parts]).cpu())["NDCG@10"]

    best = max(RANKER_WEIGHTS, key=lambda w: (ndcg(w), -w))
    correction = model.rank_head.correction
    with torch.no_grad():  # task 0 is the served score's correction; the rating task keeps its scale
        correction.weight[0] *= best
        correction.bias[0] *= best
    return best


def test_metrics(model: nn.Module, test: Split, config: TrainConfig) -> dict[str, Any]:
    """Test-set metrics under the configured full-ranking protocol (by default the papers': history excluded),
    the sampled protocol and, for HSTU, the two-stage pipeline under the full-ranking protocol."""
    full = config.eval
    sampled = EvalConfig(protocol="sampled", num_sampled_negatives=full.num_sampled_negatives, seed=full.seed)
    metrics: dict[str, Any] = {
        "protocol": {"full": full.describe(), "sampled": sampled.describe()},
        "full": evaluate(model, test, full),
        "sampled": evaluate(model, test, sampled),
    }
    if isinstance(model, HSTU):
        two_stage = evaluate_two_stage(model, test, full, retrieve_k=config.retrieve_k)
        metrics["protocol"]["two_stage"] = f"retrieve {config.retrieve_k}, re-rank; {full.describe()}"
        metrics["two_stage"] = {"retrieve_k": config.retrieve_k, **two_stage}
        metrics["protocol"]["two_stage_sampled"] = (
            f"the candidate scorer ranks the target among {sampled.num_sampled_negatives} random unseen items")
        metrics["two_stage_sampled"] = evaluate_scorer_sampled(model, test, sampled)
    return metrics


def train_set_batches(train_set: Histories, config: TrainConfig, epoch: int) -> list[SequenceBatch]:
    """Shuffled training batches of similar lengths, the same on every DDP rank (each takes its share).

    A history longer than the model's maximum length gives one row per window of it (`Histories.windows`),
    with the items of the user's events before the window as the batch's `earlier` (the loss leaves them out).
    Rows are shuffled, then sorted by length within spans of 16 batches, so a batch pads to little more than
    its own rows' lengths (attention costs the square of that); the batch order is shuffled again.
    """
    users, starts, ends = train_set.windows(config.max_len or PRESETS[config.preset]["max_len"])
    rng = np.random.default_rng(config.seed * 7919 + epoch)
    order = rng.permutation(len(users))
    lengths = ends - starts
    span = config.batch_size * 16
    for start in range(0, len(order), span):
        chunk = order[start : start + span]
        order[start : start + span] = chunk[np.argsort(lengths[chunk], kind="stable")]
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    return [train_set.cut(users[b], starts[b], ends[b]) for b in (batches[i] for i in rng.permutation(len(batches)))]


def _drop_actions(batch: SequenceBatch, p: float, generator: torch.Generator) -> SequenceBatch:
    if p <= 0:
        return batch
    keep = torch.rand(batch.actions.shape, generator=generator) >= p
    return dataclasses.replace(batch, actions=batch.actions * keep)


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow({k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()})
