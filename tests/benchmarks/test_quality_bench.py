"""The quality benchmark's quick mode writes the tables the full run does, from real training runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from genrec.benchmarks.quality import main, target_groupings
from genrec.training.datasets import Interactions
from genrec.training.popularity import DAY
from genrec.training.sequences import PreprocessConfig, build_sequences, leave_one_out


def test_quick_mode_writes_every_table_and_the_curves(tmp_path: Path) -> None:
    out = tmp_path / "quality.md"
    assert main(["--quick", "--jobs", "1", "--workdir", str(tmp_path / "runs"), "--out", str(out)]) == 0
    sections = {part.split("\n", 1)[0]: part for part in out.read_text().split("\n## ")[1:]}
    assert {"Full ranking, history excluded", "Sampled (100 negatives)", "Epochs", "Training speed"} <= set(sections)
    for title in ("Full ranking, history excluded", "Sampled (100 negatives)"):
        rows = [line.split(" | ")[0] for line in sections[title].splitlines() if line.startswith("| ")]
        assert rows[1:4] == ["| HSTU", "| SASRec", "| HSTU two-stage"], rows
    assert out.with_suffix(".png").stat().st_size > 0
    runs = json.loads(out.with_suffix(".json").read_text())
    assert [r["epochs_run"] for r in runs["HSTU"]] == [1]
    assert len(runs["SASRec"][0]["curve"]) == 1  # one validation row per epoch, plotted
    for run in (runs["HSTU"][0], runs["SASRec"][0]):  # the groups split the test users the run was scored on
        for title, groups in run["by_target"].items():
            assert f"Test HR@10 by {title}" in sections
            users = sum(g["users"] for g in groups.values())
            assert users == 943
            for protocol in ("full", "sampled"):
                hr = sum(g["users"] * g[protocol] for g in groups.values()) / users
                assert hr == pytest.approx(run[protocol]["HR@10"])
    # one seed averaged with itself is that run: the checkpoints reloaded are the models the runs scored
    table = [line.strip(" |").split(" | ") for line in sections["Runs averaged (diagnostic, not served)"].splitlines()
             if line.startswith("| ")]
    averaged = {row[0]: row[1:] for row in table[1:]}  # after the header
    assert list(averaged) == ["HSTU, 1 seed averaged", "SASRec, 1 seed averaged", "HSTU + SASRec, 2 runs averaged"]
    for name in ("HSTU", "SASRec"):
        assert averaged[f"{name}, 1 seed averaged"] == [
            f"{runs[name][0][protocol][metric]:.4f}" for protocol in ("full", "sampled") for metric in ("HR@10", "NDCG@10")]


def test_targets_are_grouped_by_popularity_and_by_the_share_of_their_events_in_the_last_30_days() -> None:
    # (user, item, day); each user's last event is its test target, the one before it the request's time
    events = [(1, 10, 54), (1, 11, 55), (1, 12, 56),  # 12 before day 55: days 0 and 40, one of two recent
              (2, 12, 0), (2, 13, 1), (2, 14, 2),  # 14 before day 1: none
              (3, 12, 40), (3, 13, 41), (3, 14, 42),  # 14 before day 41: day 2, not recent
              (4, 12, 55), (4, 15, 56), (4, 16, 57)]  # user 4's 12 is at user 1's request, so not before it
    user, item, day = (np.array(column, dtype=np.int64) for column in zip(*events, strict=True))
    keep = PreprocessConfig(min_user_interactions=3)
    data = build_sequences(Interactions(user=user, item=item, timestamp=day * DAY + 7, rating=None, name="t"), keep)
    popular, recent = target_groupings(data, leave_one_out(data))
    # training events (all but each user's last two): item 12 three times, 14 and 16 never
    assert [(label, mask.tolist()) for label, mask in popular.members()] == [
        ("0-0", [False, True, True, True]), ("1-3", [True, False, False, False])]
    assert [(label, mask.nonzero()[0].tolist()) for label, mask in recent.members()] == [
        ("no earlier event", [1, 3]), ("0-0.1", [2]), ("0.3-0.6", [0])]
    # a log without time has no "recent": popularity only
    untimed = build_sequences(Interactions(user=user, item=item, timestamp=0 * day, rating=None, name="t",
                                           timed=False), keep)
    assert [grouping.title for grouping in target_groupings(untimed, leave_one_out(untimed))] == [popular.title]
