"""Rollout under load: a running server (explicit model control) moves to a build with another catalogue.

Every answer during the move must be exactly the old build's or exactly the new build's answer for that
history, and no request may fail.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from server_constants import RETRIEVE_K

from genrec.builders.build import BuildConfig, build_repository
from genrec.builders.rollout import RolloutConfig, RolloutError, rollout
from genrec.builders.tritonserver import ServerConfig, TritonServer, free_ports
from genrec.client import RecommendClient
from genrec.training.checkpoint import load_meta
from genrec.training.datasets import SyntheticConfig
from genrec.training.prepare import DataConfig, run_training
from genrec.training.trainer import TrainConfig

pytestmark = pytest.mark.server
ADMIN_KEY = "rollout-test-key"


@pytest.fixture(scope="module")
def other_catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model of other data: 150 items where the shared tiny model has 120."""
    out = tmp_path_factory.mktemp("other_catalogue")
    data = DataConfig(source="synthetic", synthetic=SyntheticConfig(num_users=300, num_items=150, seed=1))
    run_training(data, TrainConfig(preset="tiny", epochs=2, out=out, progress=False, seed=1))
    return out / "checkpoint"


def test_rollout_to_another_catalogue_under_load_fails_and_mixes_nothing(
    tiny_checkpoint: Path, other_catalogue: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    build_repository(BuildConfig(checkpoint=tiny_checkpoint, repository=repository, retrieve_k=RETRIEVE_K))
    old_ids, new_ids = (set(load_meta(c).item_raw_ids.tolist()) for c in (tiny_checkpoint, other_catalogue))
    assert new_ids - old_ids  # the new build knows items the old one has never seen
    shared = np.array(sorted(old_ids & new_ids))
    rng = np.random.default_rng(0)
    histories = [rng.choice(shared, size=int(rng.integers(3, 12)), replace=False).tolist() for _ in range(12)]
    key_file = tmp_path / "admin-key"
    key_file.write_text(ADMIN_KEY)
    grpc, http, metrics = free_ports(3)
    config = ServerConfig(repository, grpc_port=grpc, http_port=http, metrics_port=metrics,
                          model_control="explicit", admin_key=ADMIN_KEY)

    with TritonServer(config) as server, RecommendClient(server.url, timeout_s=30, retries=0) as client:
        def answer(i: int) -> tuple[int, ...]:
            return tuple(client.recommend(histories[i], k=5).item_ids.tolist())

        old = [answer(i) for i in range(len(histories))]
        with pytest.raises(RolloutError, match="holds no complete build|restricted"):
            rollout(RolloutConfig(tmp_path / "nothing", server.url, key_file))
        answers: list[tuple[int, tuple[int, ...]]] = []
        failures: list[Exception] = []
        stop = threading.Event()

        def load(worker: int) -> None:
            i = worker
            while not stop.is_set():
                try:
                    answers.append((i % len(histories), answer(i % len(histories))))
                except Exception as error:  # noqa: BLE001 - every failure is the finding
                    failures.append(error)
                i += 1

        workers = [threading.Thread(target=load, args=(w,)) for w in range(4)]
        for w in workers:
            w.start()
        try:
            build_repository(BuildConfig(checkpoint=other_catalogue, repository=repository, retrieve_k=RETRIEVE_K))
            during = len(answers)
            assert rollout(RolloutConfig(repository, server.url, key_file)) == 2
            time.sleep(1.0)
        finally:
            stop.set()
            for w in workers:
                w.join()
        new = [answer(i) for i in range(len(histories))]

    assert not failures, failures[:3]
    assert during > 0 and len(answers) > during  # load ran before and after the switch
    assert sum(a != b for a, b in zip(old, new, strict=True)) >= len(histories) // 2  # the builds tell apart
    assert any(set(items) - old_ids for items in new)  # the new catalogue is served
    mixed = [(i, items) for i, items in answers if items not in (old[i], new[i])]
    assert not mixed, mixed[:3]
    assert {items == new[i] for i, items in answers[-8:]} == {True}  # the last answers are all the new build's
