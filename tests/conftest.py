"""Session fixtures: one tiny trained HSTU checkpoint shared by the builder and server tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from genrec.training.datasets import SyntheticConfig
from genrec.training.prepare import DataConfig, run_training
from genrec.training.trainer import TrainConfig

TINY_DATA = DataConfig(source="synthetic", synthetic=SyntheticConfig(num_users=300, num_items=120, seed=0))


@pytest.fixture(scope="session")
def tiny_data() -> DataConfig:
    return TINY_DATA


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny HSTU trained for a few epochs on synthetic data (seconds), written as a checkpoint."""
    out = tmp_path_factory.mktemp("tiny_hstu")
    run_training(TINY_DATA, TrainConfig(preset="tiny", epochs=3, out=out, progress=False, seed=0))
    return out / "checkpoint"
