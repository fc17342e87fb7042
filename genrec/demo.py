"""The main job end to end: train on MovieLens-100K, build the repository, serve it, call recommend()."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.table import Table

from genrec.builders.build import BuildConfig, build_repository
from genrec.builders.tritonserver import ServerConfig, TritonServer, free_ports
from genrec.client import RecommendClient
from genrec.training.checkpoint import load_meta
from genrec.training.prepare import DataConfig, prepare, run_training
from genrec.training.report import make_console, print_metrics
from genrec.training.trainer import TrainConfig

console = make_console()


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path = Path("runs/demo")
    repository: Path = Path("model_repository")
    epochs: int = 30
    batch_size: int = 32  # MovieLens-100K's 943 users: 30 optimiser steps an epoch, not 8 at the default 128
    max_minutes: float = 4.0
    user: str | None = None  # raw user id; default: a random user
    runtime: str = "torch"
    seed: int = 0


def run_demo(config: DemoConfig) -> int:
    started = time.monotonic()
    console.rule("1. train HSTU on MovieLens-100K")
    train = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, max_minutes=config.max_minutes,
                        out=config.workdir, seed=config.seed)
    print_metrics(run_training(DataConfig(), train))
    checkpoint = config.workdir / "checkpoint"

    console.rule("2. build the Triton model repository")
    version = build_repository(BuildConfig(checkpoint=checkpoint, repository=config.repository,
                                           runtime=config.runtime))  # type: ignore[arg-type]
    console.print(f"{config.repository}: version {version}, runtime {config.runtime}")

    console.rule("3. serve it and call recommend() over gRPC")
    data, _, _ = prepare(DataConfig())
    meta = load_meta(checkpoint)
    rng = np.random.default_rng(config.seed)
    row = int(rng.integers(len(data.users))) if config.user is None else _user_row(data.users, config.user)
    items, timestamps, actions = data.sequence(row)
    raw_items = data.item_vocab.to_raw(items)
    ratings = np.concatenate([[0.0], data.action_values])[actions]
    grpc, http, metrics = free_ports(3)
    server_config = ServerConfig(repository=config.repository, grpc_port=grpc, http_port=http, metrics_port=metrics)
    ratings = np.rint(ratings).astype(int)
    user_id = str(data.users[row])
    with TritonServer(server_config) as server, RecommendClient(server.url) as client:
        console.print(f"tritonserver ready at {server.url} (log: {server.log_path})")
        # The user's history without its last event, then again with it: the server keeps this user's K/V
        # from the first call, so the second computes only the new event.
        calls = []
        for end in (len(raw_items) - 1, len(raw_items)):
            t0 = time.perf_counter()
            result = client.recommend(raw_items[:end].tolist(), k=10, timestamps=timestamps[:end].tolist(),
                                      actions=ratings[:end].tolist(), user_id=user_id)
            calls.append(((time.perf_counter() - t0) * 1e3, result.cached_events, end))
        latency_ms = calls[-1][0]
    for i, (ms, cached, end) in enumerate(calls, start=1):
        reuse = f"{cached} of {end} events from the user cache" if cached else "whole history computed"
        console.print(f"call {i}: {end} events, {ms:.1f} ms ({reuse})")
    titles = dict(zip(meta.item_raw_ids.tolist(), meta.item_titles[1:].tolist(), strict=True))
    console.print(f"user {data.users[row]}: {len(raw_items)} ratings; the last five:")
    for item, rating in zip(raw_items[-5:], ratings[-5:], strict=True):
        console.print(f"   {'★' * int(rating):5s} {titles[int(item)]}")
    table = Table(title=f"recommend(user {data.users[row]}, k=10) in {latency_ms:.1f} ms")
    table.add_column("#", justify="right")
    table.add_column("movie")
    table.add_column("item id", justify="right")
    table.add_column("score", justify="right")
    for i, scored in enumerate(result, start=1):
        table.add_row(str(i), titles.get(scored.item_id, "?"), str(scored.item_id), f"{scored.score:.3f}")
    console.print(table)
    console.print(f"done in {time.monotonic() - started:.0f} s; the server has stopped.")
    return 0


def _user_row(users: np.ndarray, user: str) -> int:
    matches = np.flatnonzero(users.astype(str) == str(user))
    if len(matches) == 0:
        raise SystemExit(f"user {user!r} is not in MovieLens-100K (ids 1..{len(users)})")
    return int(matches[0])
