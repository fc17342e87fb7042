"""The serving benchmarks' models and servers: checkpoints (made once, reused), repositories built fresh, and
tritonservers started on them with a thread budget."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from genrec.benchmarks.common import REPO_ROOT
from genrec.benchmarks.serving_config import ServingBenchConfig, Weights
from genrec.benchmarks.serving_data import History
from genrec.builders.tritonserver import (
    ServerConfig,
    TritonServer,
    find_tritonserver,
    free_ports,
)


@dataclass(frozen=True)
class Served:
    """One served configuration: a model, a runtime, batching on or off."""

    label: str
    model: Literal["small", "reference"]
    runtime: Literal["torch", "onnx"] = "torch"
    dynamic_batching: bool = True

    @property
    def slug(self) -> str:
        return f"{self.model}_{self.runtime}_{'batching' if self.dynamic_batching else 'nobatching'}"


REF_ON = Served("reference, batching on", "reference")
REF_OFF = Served("reference, batching off", "reference", dynamic_batching=False)
SMALL_TORCH = Served("small, torch", "small")
SMALL_ONNX = Served("small, onnx", "small", runtime="onnx")


def shown(path: Path) -> Path:
    """A path as a report shows it: relative to the repository when inside it."""
    path = Path(path).absolute()
    return path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path


# ---- checkpoints ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    preset: str
    description: str
    max_len: int


def _describe(path: Path, origin: str) -> tuple[str, int]:
    config = json.loads((path / "config.json").read_text())
    model = config["model"]
    dims = f"d={model['d_model']}, {model['num_layers']} layers, {model['num_heads']} heads, max_len {model['max_len']}"
    metrics_path = path / "metrics.json"
    trained = ""
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        if "epochs_run" in metrics:
            hr = metrics.get("full", {}).get("HR@10")
            trained = f"trained {metrics['epochs_run']} epoch(s) in {metrics.get('train_seconds', '?')} s" + (
                f", test HR@10 {hr:.4f}" if hr is not None else ""
            )
        elif metrics.get("untrained"):
            trained = "UNTRAINED weights (initialisation), saved through the checkpoint code"
    return f"{dims}; {trained}; {origin} `{shown(path)}`", int(model["max_len"])


def save_untrained(preset: str, out: Path, seed: int, max_len: int | None = None) -> None:
    """A model of the preset's size at its initialisation, on ML-100K's vocabulary, as a real checkpoint."""
    import torch

    from genrec.training.checkpoint import CheckpointMeta, save_checkpoint
    from genrec.training.prepare import DataConfig, prepare
    from genrec.training.trainer import TrainConfig, make_model

    data, _, name = prepare(DataConfig())
    config = TrainConfig(preset=preset, epochs=0, out=out.parent, progress=False, seed=seed, max_len=max_len)
    torch.manual_seed(seed)
    model = make_model(config, data).eval()
    meta = CheckpointMeta(
        model_config=model.config,
        item_raw_ids=data.item_vocab.raw_ids,
        item_titles=data.item_titles,
        action_values=data.action_values,
        data={
            "name": name,
            "num_users": len(data.users),
            "num_events": int(len(data.items)),
            "genre_names": list(data.genre_names),
        },
        train=dataclasses.asdict(config),
    )
    save_checkpoint(out, model, meta, {"untrained": True})


def make_checkpoint(
    preset: str,
    given: Path | None,
    weights: Weights,
    epochs: int,
    max_minutes: float | None,
    cfg: ServingBenchConfig,
) -> Checkpoint:
    """The given checkpoint, else the one cached under runs/bench, else a new one (trained or untrained)."""
    if given is not None:
        description, max_len = _describe(given, "given")
        return Checkpoint(given, preset, description, max_len)
    trained = cfg.work_dir / preset / "checkpoint"
    untrained = cfg.work_dir / f"{preset}-untrained" / "checkpoint"
    if not cfg.retrain and (trained / "config.json").exists():
        description, max_len = _describe(trained, "reused from")
        return Checkpoint(trained, preset, description, max_len)
    if weights == "trained":
        from genrec.training.prepare import DataConfig, run_training
        from genrec.training.trainer import TrainConfig

        print(
            f"training preset {preset!r} on ML-100K for {epochs} epoch(s) into {trained.parent} ...",
            flush=True,
        )
        run_training(
            DataConfig(),
            TrainConfig(
                preset=preset,
                epochs=epochs,
                max_minutes=max_minutes,
                out=trained.parent,
                progress=False,
                seed=cfg.seed,
            ),
        )
        description, max_len = _describe(trained, "trained by this run into")
        return Checkpoint(trained, preset, description, max_len)
    if cfg.retrain or not (untrained / "config.json").exists():
        save_untrained(preset, untrained, cfg.seed)
    description, max_len = _describe(untrained, "in")
    return Checkpoint(untrained, preset, description, max_len)


# ---- servers ----------------------------------------------------------------------------------------------


MODEL_VERSION = 1  # every benchmark repository is built fresh


def build(checkpoint: Path, served: Served, cfg: ServingBenchConfig) -> Path:
    """A fresh repository for one served configuration (so every model is version ``MODEL_VERSION``)."""
    from genrec.builders.build import BuildConfig, build_repository

    repository = cfg.work_dir / "repos" / served.slug
    shutil.rmtree(repository, ignore_errors=True)
    version = build_repository(
        BuildConfig(
            checkpoint=checkpoint,
            repository=repository,
            runtime=served.runtime,
            retrieve_k=cfg.retrieve_k,
            max_batch_size=cfg.max_batch_size,
            dynamic_batching=served.dynamic_batching,
            max_queue_delay_us=cfg.max_queue_delay_us,
        )
    )
    assert version == MODEL_VERSION, f"{repository} was not empty"
    return repository


def thread_env(threads: int) -> dict[str, str]:
    """Threads of the numeric libraries in each Python-backend model instance. Several instances share the
    cores, and torch's default (one thread per core each) oversubscribes them badly."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


@contextlib.contextmanager
def running_servers(
    repositories: Sequence[Path], threads: int, log_dir: Path, ready_timeout_s: float = 900.0
) -> Iterator[list[TritonServer]]:
    """One tritonserver per repository, all started together (loopback only), stopped on exit."""
    install = find_tritonserver()
    install = dataclasses.replace(install, env={**install.env, **thread_env(threads)})
    ports = free_ports(3 * len(repositories))
    log_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        servers = []
        for i, repository in enumerate(repositories):
            grpc, http, metrics = ports[3 * i : 3 * i + 3]
            server = TritonServer(
                ServerConfig(
                    repository,
                    host="127.0.0.1",
                    grpc_port=grpc,
                    http_port=http,
                    metrics_port=metrics,
                    log_file=log_dir / f"{repository.name}.log",
                ),
                install,
            )
            stack.callback(server.stop)
            server.start()
            servers.append(server)
        for server in servers:
            server.wait_ready(timeout_s=ready_timeout_s)  # a loaded 2-core machine needs minutes, not seconds
        yield servers


def warm_up(url: str, histories: Sequence[History], requests: int, k: int) -> float:
    """Untimed calls (longest history first, then a concurrent burst); returns a rough requests/s at
    concurrency 1, to size the first measurement."""
    from genrec.client import RecommendClient

    chosen = sorted(histories, key=len, reverse=True)[:1] + list(histories[:requests])
    with RecommendClient(url, timeout_s=300, retries=0) as client:
        for h in chosen[:2]:
            client.recommend(h.items, k=k, timestamps=h.timestamps, actions=h.ratings)
        start = time.perf_counter()
        for h in chosen[2:]:
            client.recommend(h.items, k=k, timestamps=h.timestamps, actions=h.ratings)
        rate = max(1, len(chosen) - 2) / max(time.perf_counter() - start, 1e-3)
        client.recommend_batch(
            [h.items for h in chosen],
            k=k,
            timestamps=[h.timestamps for h in chosen],
            actions=[h.ratings for h in chosen],
        )
    return rate


# ---- perf_analyzer ----------------------------------------------------------------------------------------
