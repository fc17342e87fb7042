"""The quality benchmark's quick mode writes the tables the full run does, from real training runs."""

from __future__ import annotations

import json
from pathlib import Path

from genrec.benchmarks.quality import main


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
