"""From a data source to trained checkpoints and evaluations: the glue the CLI and benchmarks call."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from genrec.training.checkpoint import load_checkpoint
from genrec.training.datasets import (
    ColumnMapping,
    Interactions,
    SyntheticConfig,
    load_ml100k,
    load_movielens_ratings,
    load_table,
    synthetic,
)
from genrec.training.metrics import EvalConfig
from genrec.training.sequences import (
    LeaveOneOut,
    PreprocessConfig,
    SequenceData,
    build_sequences,
    leave_one_out,
)
from genrec.training.trainer import TrainConfig, console, test_metrics, train


@dataclass(frozen=True)
class DataConfig:
    source: str = "ml-100k"  # ml-100k | synthetic | a ratings.dat / ratings.csv | any .csv / .parquet log
    columns: ColumnMapping = field(default_factory=ColumnMapping)  # for generic tables
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def save(self, checkpoint: Path) -> None:
        """Recorded beside the weights (``data_config.json``), so that `genrec eval` finds the same data."""
        source = self.source if self.source in ("ml-100k", "synthetic") else str(Path(self.source).resolve())
        checkpoint.mkdir(parents=True, exist_ok=True)
        (checkpoint / DATA_CONFIG_FILE).write_text(json.dumps(asdict(replace(self, source=source)), indent=2))

    @staticmethod
    def load(checkpoint: Path) -> DataConfig:
        path = checkpoint / DATA_CONFIG_FILE
        if not path.exists():
            raise FileNotFoundError(f"{checkpoint} does not record its data ({DATA_CONFIG_FILE}): pass --data")
        d = json.loads(path.read_text())
        return DataConfig(d["source"], ColumnMapping(**d["columns"]), PreprocessConfig(**d["preprocess"]),
                          SyntheticConfig(**d["synthetic"]))


DATA_CONFIG_FILE = "data_config.json"


def load_interactions(config: DataConfig) -> Interactions:
    if config.source == "ml-100k":
        return load_ml100k()
    if config.source == "synthetic":
        return synthetic(config.synthetic)
    path = Path(config.source)
    if not path.exists():
        raise FileNotFoundError(f"data source {config.source!r}: no such file (or use 'ml-100k' / 'synthetic')")
    if path.name.startswith("ratings.") and path.suffix in (".dat", ".csv"):
        return load_movielens_ratings(path)
    return load_table(path, config.columns)


def prepare(config: DataConfig) -> tuple[SequenceData, LeaveOneOut, str]:
    log = load_interactions(config)
    data = build_sequences(log, config.preprocess)
    console.print(kept_summary(log, data, config.preprocess))
    return data, leave_one_out(data), log.name


def kept_summary(log: Interactions, data: SequenceData, config: PreprocessConfig) -> str:
    """What the filter kept of the log, and what it dropped."""
    users, items, events = len(np.unique(log.user)), len(np.unique(log.item)), len(log)
    kept_users, kept_items, kept_events = len(data.users), len(data.item_vocab), int(len(data.items))
    rule = f"users with < {config.min_user_interactions} events" + (
        f", items with < {config.min_item_interactions}" if config.min_item_interactions else "")
    return (f"data {log.name}: kept {kept_users:,} users, {kept_items:,} items, {kept_events:,} events; dropped "
            f"{users - kept_users:,} users, {items - kept_items:,} items, {events - kept_events:,} events ({rule}); "
            f"{data.tied_share():.0%} of consecutive events share their timestamp")


def run_training(
    data_config: DataConfig, config: TrainConfig, prepared: tuple[SequenceData, LeaveOneOut, str] | None = None
) -> dict[str, Any]:
    """Train on `data_config`'s log; `prepared`: what `prepare(data_config)` gave, when the caller has it."""
    data, split, name = prepared or prepare(data_config)
    data_config.save(Path(config.out) / "checkpoint")
    return train(config, data, split.train, split.valid, split.test, data_name=name)


def evaluate_checkpoint(
    checkpoint: Path, data_config: DataConfig, split_name: str = "test", exclude_history: bool = True
) -> dict[str, Any]:
    """Re-evaluate a checkpoint on its data. The data must give the same vocabulary as at training time."""
    model, meta = load_checkpoint(checkpoint)
    data, split, _ = prepare(data_config)
    if len(data.item_vocab) != len(meta.item_raw_ids) or (data.item_vocab.raw_ids != meta.item_raw_ids).any():
        raise ValueError(f"{checkpoint} was trained on other data: its item vocabulary differs from {data_config.source}")
    config = TrainConfig(model=meta.model_type, eval=EvalConfig(exclude_history=exclude_history))
    return test_metrics(model, split.test if split_name == "test" else split.valid, config)
