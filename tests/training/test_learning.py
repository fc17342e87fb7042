"""End to end: the trainer learns the synthetic log's planted rule, writes its files, and resumes exactly.

Synthetic data: items on a hidden cycle, the next item is the successor with probability 0.9, and
popularity is near uniform, so chance HR@10 is 10 / num_items = 0.1 and a model that learned the rule
approaches 0.9. Four epochs of the tiny preset reach 0.74-0.88 over data/training seeds 0-3 (0.77 at seed 0);
the test asks for 5x chance (0.5), which no model that did not learn the sequence can reach.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from genrec.training.checkpoint import load_checkpoint
from genrec.training.datasets import SyntheticConfig
from genrec.training.evaluate import evaluate, evaluate_scorer_sampled, rerank
from genrec.training.hstu import HSTU
from genrec.training.metrics import EvalConfig, metrics_from_ranks
from genrec.training.popularity import PopularityConfig, popularity_table
from genrec.training.prepare import DataConfig, evaluate_checkpoint, prepare, run_training
from genrec.training.trainer import RANKER_WEIGHTS, TrainConfig, WeightAverage, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_ITEMS = 100
CHANCE_HR10 = 10 / NUM_ITEMS
DATA = DataConfig(source="synthetic", synthetic=SyntheticConfig(num_users=400, num_items=NUM_ITEMS, min_len=20, max_len=40))



def config(out: Path, epochs: int, resume: bool = False) -> TrainConfig:
    return TrainConfig(preset="tiny", epochs=epochs, batch_size=64, lr=3e-3, warmup_steps=10, patience=10,
                       seed=0, out=out, resume=resume, progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """2 epochs, then resumed to 4; and the same 4 epochs in one go."""
    resumed = tmp_path_factory.mktemp("resumed")
    first = run_training(DATA, config(resumed, epochs=2))
    second = run_training(DATA, config(resumed, epochs=4, resume=True))
    straight = tmp_path_factory.mktemp("straight")
    return {"first": first, "second": second, "straight": run_training(DATA, config(straight, epochs=4)),
            "out": resumed}


def test_hstu_learns_the_planted_sequences(runs: dict[str, Any]) -> None:
    metrics = runs["straight"]
    assert "events tied in time as one set of targets" in metrics["loss"]
    assert metrics["full"]["HR@10"] >= 5 * CHANCE_HR10, metrics["full"]
    assert metrics["two_stage"]["HR@10"] >= 5 * CHANCE_HR10, metrics["two_stage"]
    # the sampled protocol ranks the target among 101 items: chance is ~10 / 101
    assert metrics["sampled"]["HR@10"] >= 5 * 10 / 101, metrics["sampled"]
    assert metrics["full"]["NDCG@10"] <= metrics["full"]["HR@10"] <= metrics["full"]["HR@50"]


def test_training_writes_its_files(runs: dict[str, Any]) -> None:
    out: Path = runs["out"]
    for name in ("metrics.csv", "trainer_state.pt", "train_config.json"):
        assert (out / name).is_file(), name
    checkpoint = out / "checkpoint"
    for name in ("model.safetensors", "config.json", "vocab.json", "metrics.json"):
        assert (checkpoint / name).is_file(), name
    written = json.loads((checkpoint / "metrics.json").read_text())
    assert written["full"] == runs["second"]["full"] and written["epochs_run"] == 4
    assert json.loads((out / "train_config.json").read_text())["resume"] is True

    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]  # the resumed run appended epochs 2 and 3
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])

    model, meta = load_checkpoint(checkpoint)
    assert isinstance(model, HSTU) and len(meta.item_raw_ids) == NUM_ITEMS
    assert meta.item_raw_ids.dtype.kind == "i"
    # the checkpoint alone reproduces the test metrics the trainer reported
    assert evaluate_checkpoint(checkpoint, DATA)["full"] == runs["second"]["full"]


def test_resume_continues_where_it_stopped(runs: dict[str, Any]) -> None:
    assert runs["first"]["epochs_run"] == 2
    assert runs["second"]["epochs_run"] == 4
    # optimiser, scheduler, RNG and early-stopping state all came back: the result is that of one run
    for protocol in ("full", "sampled", "two_stage"):
        assert runs["second"][protocol] == runs["straight"][protocol], protocol
    assert runs["second"]["best_epoch"] == runs["straight"]["best_epoch"]


def test_resume_past_the_last_epoch_trains_no_more(runs: dict[str, Any]) -> None:
    again = run_training(DATA, config(runs["out"], epochs=4, resume=True))
    assert again["epochs_run"] == 4 and again["full"] == runs["second"]["full"]


def test_the_ranker_weight_is_the_best_on_validation_and_is_baked_into_the_served_score(runs: dict[str, Any]) -> None:
    """calibrate_ranker picked the grid's best weight for the served pipeline on the validation events, and
    scaled the head so that the checkpoint serves retrieval + that weight x the trained correction."""
    metrics = runs["second"]  # the run whose checkpoint is in runs["out"]
    weight = metrics["ranker_weight"]
    assert weight in RANKER_WEIGHTS
    model, _ = load_checkpoint(runs["out"] / "checkpoint")
    assert isinstance(model, HSTU)
    _, split, _ = prepare(DATA)
    served = EvalConfig(exclude_history=True)
    parts = rerank(model, split.valid, served)

    def ndcg(scale: float) -> float:
        return metrics_from_ranks(torch.cat([p.ranks(scale) for p in parts]))["NDCG@10"]

    # the saved head already holds the weight: relative to it, 1 is the choice and every other weight w
    # on the grid is w / weight
    if weight > 0:
        chosen = ndcg(1.0)
        assert all(ndcg(w / weight) <= chosen + 1e-12 for w in RANKER_WEIGHTS)
    else:  # weight 0: the served order is retrieval's, the correction is gone
        assert all(float(p.correction.abs().max()) < 1e-4 for p in parts)
    served_metrics = metrics["two_stage"]
    assert served_metrics["HR@10"] >= 5 * CHANCE_HR10, served_metrics


def test_a_fresh_run_in_a_used_folder_starts_a_new_log(tmp_path: Path) -> None:
    run_training(DATA, config(tmp_path, epochs=2))
    run_training(DATA, config(tmp_path, epochs=1))  # not resumed: trains from scratch
    with (tmp_path / "metrics.csv").open() as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0]


def test_the_checkpoint_carries_the_popularity_of_its_whole_log(runs: dict[str, Any], tmp_path: Path) -> None:
    model, _ = load_checkpoint(runs["out"] / "checkpoint")
    data, _, _ = prepare(DATA)
    table = popularity_table(data.timestamps, data.items, len(data.item_vocab), PopularityConfig())
    assert isinstance(model, HSTU) and model.popularity is not None
    np.testing.assert_array_equal(model.popularity.cumulative.numpy(), table.cumulative)
    assert int(model.popularity.cumulative[-1].sum()) == len(data.items)  # every event, held-out ones too
    without = make_model(replace(config(tmp_path, epochs=1), popularity=PopularityConfig(enabled=False)), data)
    assert isinstance(without, HSTU) and without.popularity is None and without.rank_head.features is None


@pytest.mark.parametrize(("min_epochs", "expected"), [(0, 2), (3, 4)])
def test_patience_counts_only_from_min_epochs(tmp_path: Path, min_epochs: int, expected: int) -> None:
    """lr 0: validation never improves after epoch 0, so patience 1 ends the run at the first epoch it counts."""
    frozen = replace(config(tmp_path, epochs=10), lr=0.0, patience=1, min_epochs=min_epochs, calibrate_ranker=False)
    metrics = run_training(DATA, frozen)
    assert metrics["epochs_run"] == expected and metrics["best_epoch"] == 0


def test_the_sampled_two_stage_row_ranks_the_same_candidates_as_retrieval(tmp_path: Path) -> None:
    """An untrained ranking head's correction is exactly 0, so the scorer ranks the sampled protocol's 101
    items as retrieval does: the same negatives, the same ranks."""
    data, split, _ = prepare(DATA)
    model = make_model(TrainConfig(preset="tiny"), data)
    assert isinstance(model, HSTU)
    sampled = EvalConfig(protocol="sampled")
    assert evaluate_scorer_sampled(model, split.test, sampled) == evaluate(model, split.test, sampled)


def test_a_log_without_time_trains_hstu_without_time_bias_or_popularity(tmp_path: Path) -> None:
    untimed = replace(DATA, synthetic=replace(DATA.synthetic, timed=False))
    data, _, _ = prepare(untimed)
    model = make_model(TrainConfig(preset="tiny"), data)
    assert isinstance(model, HSTU) and model.popularity is None
    assert all(layer.bias.time is None for layer in model.blocks)
    metrics = run_training(untimed, replace(config(tmp_path, epochs=3), calibrate_ranker=False))
    assert metrics["full"]["HR@10"] >= 3 * CHANCE_HR10, metrics["full"]
    assert "tied" not in metrics["loss"]  # every event is at time 0: the log's order is all there is


def test_an_interrupted_run_leaves_its_best_weights_to_evaluate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after its epochs (here: inside the end's calibration), a run has a checkpoint of its best epoch
    so far, with no test metrics, that `genrec eval` reads (it records its data), and a state to resume from."""
    import genrec.training.trainer as trainer

    def killed(*args: object, **kwargs: object) -> float:
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "calibrate_ranker", killed)
    with pytest.raises(KeyboardInterrupt):
        run_training(DATA, config(tmp_path, epochs=3))
    checkpoint = tmp_path / "checkpoint"
    assert not (checkpoint / "metrics.json").exists()
    best = torch.load(tmp_path / "trainer_state.pt", weights_only=False)["best_epoch"]
    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {"train_retrieval_loss", "train_ranking_loss"} <= set(rows[0])  # each loss term, per epoch
    assert best == max(range(len(rows)), key=lambda e: float(rows[e]["val_NDCG@10"]))
    metrics = evaluate_checkpoint(checkpoint, DataConfig.load(checkpoint))
    assert metrics["full"]["HR@10"] >= 5 * CHANCE_HR10  # the best epoch's weights, not an untrained model


def test_the_weight_average_follows_its_decay_and_gives_the_model_back() -> None:
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, epochs=2)  # 2 epochs of 2 steps: at most decay 0.75, (1 + t) / (10 + t) before
    expected = [p.detach().clone() for p in model.parameters()]
    for step in range(1, 40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        decay = min(0.75, (1 + step) / (10 + step))
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, model.parameters(), strict=True)]
        average.update(model, steps_per_epoch=2)
    own = [p.detach().clone() for p in model.parameters()]
    with average.applied(model):
        for p, e in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(p.detach(), e)
    for p, o in zip(model.parameters(), own, strict=True):
        assert torch.equal(p.detach(), o)  # its own weights again
    assert not torch.allclose(expected[0], own[0])  # the check can fail: the average lags the weights


def test_an_averaged_run_checkpoints_the_weights_it_validated_and_resumes_to_the_same_end(tmp_path: Path) -> None:
    def averaged(out: Path, epochs: int, resume: bool = False) -> TrainConfig:
        return replace(config(out, epochs, resume), ema_epochs=1.0, calibrate_ranker=False)

    straight = run_training(DATA, averaged(tmp_path / "straight", epochs=3))
    run_training(DATA, averaged(tmp_path / "resumed", epochs=2))
    resumed = run_training(DATA, averaged(tmp_path / "resumed", epochs=3, resume=True))
    for protocol in ("full", "sampled", "two_stage"):  # the average is part of the resumable state
        assert resumed[protocol] == straight[protocol], protocol
    log = list(csv.DictReader((tmp_path / "straight" / "metrics.csv").open()))
    model, _ = load_checkpoint(tmp_path / "straight" / "checkpoint")
    _, split, _ = prepare(DATA)
    best = max(log, key=lambda row: float(row["val_NDCG@10"]))
    assert evaluate(model, split.valid, EvalConfig())["NDCG@10"] == pytest.approx(float(best["val_NDCG@10"]), abs=1e-6)


# One full-softmax step over (2,000 x 5,000) logits, 40 MB: over glibc's mmap ceiling, so each fresh tensor
# used to be a new mapping and page faults; prints the minor page faults of each of 16 steps.
STEP_FAULTS = """
import resource, sys
import torch
import torch.nn.functional as F
from genrec.training.losses import LossConfig, Targets, full_softmax_loss
from genrec.training.trainer import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
g = torch.Generator().manual_seed(0)
table = F.normalize(torch.randn(5001, 16, generator=g), dim=-1).requires_grad_()
user = F.normalize(torch.randn(2000, 16, generator=g), dim=-1)
targets = Targets.one_each(torch.randint(1, 5001, (2000,), generator=g))
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    full_softmax_loss(user, targets, table, LossConfig(kind="full")).backward()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_kept_host_memory_lets_repeated_steps_reuse_their_large_tensors_without_page_faults() -> None:
    faults = {}
    for mode in ("keep", "default"):
        run = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
        faults[mode] = [int(line) for line in run.stdout.split()]
    # The kept heap still grows by a tensor or a few now and then: in 12 runs of 20 steps, in each run's first
    # 3-7 steps and in 5 runs once more (steps 11-14). Over the last 6 of 16 steps that is at most one such
    # step, against glibc's own mapping at every one of them.
    steady = {mode: sum(counts[-6:]) for mode, counts in faults.items()}
    assert steady["keep"] * 4 < steady["default"], faults
