"""TensorRT plans: contract 3 of DESIGN.md for fp16 (same top-10 as PyTorch on >= 95% of users).

``TensorRTRuntime`` (the Runtime protocol on the plans) is compared with ``TorchRuntime``.
Tolerance: fp16 rounds scores of magnitude ~20 (the retrieval logit / temperature 0.05) by ~1e-2, so candidates
whose fp32 scores are that close may swap: the contract compares the set of the top 10 of 200 candidates per
user, end to end (TensorRT prefill feeding the TensorRT scorer vs the PyTorch runtime), and asks for >= 95% of
users to agree exactly. Skipped where TensorRT or a CUDA GPU is missing (always, on the CPU machines); the
fail-early check of ``build_repository(runtime="tensorrt")`` runs everywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from genrec.builders.onnx_export import export_onnx
from genrec.builders.runtimes import TorchRuntime
from genrec.builders.tensorrt_build import TensorRTConfig, build_engines, tensorrt_available
from genrec.training.checkpoint import CheckpointMeta, save_checkpoint
from genrec.training.hstu import HSTU, HSTUConfig

NUM_ITEMS, NUM_ACTIONS, TOP_K, NUM_CANDIDATES = 500, 4, 10, 200


def make_checkpoint(directory: Path) -> Path:
    """A small HSTU with weights re-drawn at std 0.3, so the history matters to the scores."""
    torch.manual_seed(0)
    config = HSTUConfig(
        num_items=NUM_ITEMS, num_actions=NUM_ACTIONS, d_model=32, num_layers=2, num_heads=2, d_qk=16, d_v=16,
        max_len=64, num_time_buckets=16,
    )  # fmt: skip
    model = HSTU(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    meta = CheckpointMeta(
        model_config=config,
        item_raw_ids=np.arange(1, NUM_ITEMS + 1, dtype=np.int64),
        item_titles=np.array([""] * (NUM_ITEMS + 1), dtype=object),
        action_values=np.arange(1, NUM_ACTIONS, dtype=np.float64),
    )
    save_checkpoint(directory, model, meta)
    return directory


def _need_tensorrt_gpu() -> None:
    ok, reason = tensorrt_available()
    if not ok:
        pytest.skip(f"TensorRT is not available: {reason}")
    if not torch.cuda.is_available():
        pytest.skip("running the plans needs a CUDA GPU visible to torch")
    pytest.importorskip("tensorrt", reason="running the plans needs the tensorrt Python package")


def _users(rng: np.random.Generator, batch: int) -> tuple[np.ndarray, ...]:
    length = int(rng.integers(1, 65))
    items = rng.integers(1, NUM_ITEMS + 1, (batch, length))
    timestamps = 1_000_000_000 + np.cumsum(rng.integers(0, 10**7, (batch, length)), axis=1)
    actions = rng.integers(0, NUM_ACTIONS, (batch, length))
    lengths = rng.integers(1, length + 1, batch)
    lengths[0] = length
    candidates = np.stack([rng.choice(NUM_ITEMS, NUM_CANDIDATES, replace=False) + 1 for _ in range(batch)])
    return items, timestamps, actions, lengths, candidates


def test_tensorrt_fp16_top10_matches_torch(tmp_path: Path) -> None:
    """Contract 3, end to end through the Runtime protocol: TensorRTRuntime's prefill feeding its scorer."""
    _need_tensorrt_gpu()
    from genrec.builders.tensorrt_build import TensorRTRuntime

    checkpoint = make_checkpoint(tmp_path / "checkpoint")
    onnx_files = export_onnx(checkpoint, tmp_path / "onnx")
    # max_batch 16 < the 32-user batches and max_candidates 128 < 200: both chunking paths run
    config = TensorRTConfig(fp16=True, max_batch=16, max_len=64, max_candidates=128, opt_len=32, opt_candidates=100)
    build_engines(onnx_files, tmp_path / "plans", config)
    engines = TensorRTRuntime(tmp_path / "plans")
    reference = TorchRuntime(checkpoint)

    rng = np.random.default_rng(0)
    agree = total = 0
    for batch in (1, 8, 32, 32, 32):
        items, timestamps, actions, lengths, candidates = _users(rng, batch)
        cache = reference.prefill(items, timestamps, actions, lengths)
        want = reference.score(cache, timestamps, lengths, candidates)
        got_cache = engines.prefill(items, timestamps, actions, lengths)
        assert got_cache.keys.shape == cache.keys.shape and got_cache.values.shape == cache.values.shape
        assert got_cache.user.shape == cache.user.shape and got_cache.user.dtype == np.float32
        got = engines.score(got_cache, timestamps, lengths, candidates)
        assert got.shape == want.shape and got.dtype == np.float32

        top_want = np.argsort(-want, axis=1)[:, :TOP_K]
        top_got = np.argsort(-got, axis=1)[:, :TOP_K]
        agree += sum(set(a) == set(b) for a, b in zip(top_want, top_got, strict=True))
        total += batch
    assert agree / total >= 0.95, f"same top-{TOP_K} on {agree}/{total} users"

    too_long = np.ones((1, 65), dtype=np.int64)
    with pytest.raises(ValueError, match="1..64"):
        engines.prefill(too_long, too_long, too_long, np.array([65]))


def test_build_repository_tensorrt_writes_engines(tmp_path: Path) -> None:
    _need_tensorrt_gpu()
    from genrec.builders.build import BuildConfig, build_repository
    from genrec.builders.handlers import UserEncoder, load_handler
    from genrec.builders.tensorrt_build import TensorRTRuntime

    checkpoint = make_checkpoint(tmp_path / "checkpoint")
    repository = tmp_path / "repository"
    version = build_repository(
        BuildConfig(checkpoint=checkpoint, repository=repository, runtime="tensorrt", device="cuda", retrieve_k=50)
    )
    for model in ("user_encoder", "candidate_scorer"):
        version_dir = repository / model / str(version)
        assert (version_dir / "tensorrt" / "prefill.plan").stat().st_size > 0
        assert (version_dir / "tensorrt" / "scorer.plan").stat().st_size > 0
        assert 'string_value: "tensorrt"' in (repository / model / "config.pbtxt").read_text()
    encoder = load_handler("user_encoder", repository / "user_encoder" / str(version), {"runtime": "tensorrt"})
    assert isinstance(encoder, UserEncoder) and isinstance(encoder.runtime, TensorRTRuntime)


def test_build_repository_tensorrt_without_tensorrt_fails_early(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs everywhere: where TensorRT is missing (or made to look missing) the build stops before writing."""
    from genrec.builders.build import BuildConfig, build_repository

    if tensorrt_available()[0]:
        monkeypatch.setattr(
            "genrec.builders.tensorrt_build.tensorrt_available", lambda: (False, "TensorRT hidden by this test")
        )
    repository = tmp_path / "repository"
    first = build_repository(BuildConfig(checkpoint=tiny_checkpoint, repository=repository))
    before = sorted(str(p.relative_to(repository)) for p in repository.rglob("*"))
    with pytest.raises(RuntimeError, match="TensorRT"):
        build_repository(BuildConfig(checkpoint=tiny_checkpoint, repository=repository, runtime="tensorrt"))
    assert sorted(str(p.relative_to(repository)) for p in repository.rglob("*")) == before
    assert not (repository / "user_encoder" / str(first + 1)).exists()


def test_trtexec_gets_the_profiles_and_the_fp32_island(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a GPU: a stand-in trtexec records its command line and writes the plan."""
    onnx_files = export_onnx(make_checkpoint(tmp_path / "checkpoint"), tmp_path / "onnx")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "trtexec"
    fake.write_text(
        '#!/bin/sh\necho "$@" >> "$(dirname "$0")/calls"\n'
        'for a in "$@"; do case "$a" in --saveEngine=*) touch "${a#--saveEngine=}";; esac; done\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setattr("genrec.builders.tensorrt_build._python_api", lambda: (False, "not in this test"))

    plans = build_engines(onnx_files, tmp_path / "plans", TensorRTConfig(max_batch=16, max_len=64, opt_len=32))
    assert plans.prefill.exists() and plans.scorer.exists()
    prefill_call, scorer_call = (bin_dir / "calls").read_text().splitlines()
    assert "--minShapes=items:1x1,timestamps:1x1,actions:1x1,lengths:1" in prefill_call
    assert "--maxShapes=items:16x64,timestamps:16x64,actions:16x64,lengths:16" in prefill_call
    # keys/values: (B, layers, L, H, d_qk) with the history length on axis 2
    assert "--optShapes=keys:8x2x32x2x16,values:8x2x32x2x16,timestamps:8x32,lengths:8,user:8x32,candidates:8x100" in scorer_call
    assert "--fp16" in scorer_call and "--precisionConstraints=obey" in scorer_call
    assert "/Log:fp32" in scorer_call and "/Log:fp32" in prefill_call
