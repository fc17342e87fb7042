"""TensorRT plans: contract 3 of DESIGN.md for fp16 (same top-10 as PyTorch on >= 95% of users).

Tolerance: fp16 rounds scores of magnitude ~20 (the retrieval logit / temperature 0.05) by ~1e-2, so candidates
whose fp32 scores are that close may swap: the contract compares the set of the top 10 of 200 candidates per
user, end to end (TensorRT prefill feeding the TensorRT scorer vs the PyTorch runtime), and asks for >= 95% of
users to agree exactly. Skipped where TensorRT or a CUDA GPU is missing (always, on the CPU machines).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from genrec.builders.onnx_export import PREFILL_OUTPUTS, SCORER_OUTPUTS, export_onnx, names
from genrec.builders.runtimes import TorchRuntime
from genrec.builders.tensorrt_build import TensorRTConfig, build_engines, tensorrt_available
from genrec.training.checkpoint import CheckpointMeta, model_config_dict, save_checkpoint
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
        model_type="hstu",
        model_config=model_config_dict(config),
        item_raw_ids=np.arange(1, NUM_ITEMS + 1, dtype=np.int64),
        item_titles=np.array([""] * (NUM_ITEMS + 1), dtype=object),
        action_values=np.arange(1, NUM_ACTIONS, dtype=np.float64),
    )
    save_checkpoint(directory, model, meta)
    return directory


class Engine:
    """Runs one plan on the GPU through the tensorrt Python API (TensorRT 10 I/O-tensor calls)."""

    def __init__(self, plan: Path) -> None:
        import tensorrt as trt

        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        self.context = self.engine.create_execution_context()

    def __call__(self, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        device_inputs = {name: torch.from_numpy(np.ascontiguousarray(a)).cuda() for name, a in inputs.items()}
        for name, tensor in device_inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        results = []
        for name in outputs:
            result = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(name, result.data_ptr())
            results.append(result)
        stream = torch.cuda.current_stream()
        assert self.context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return [r.cpu().numpy() for r in results]


def test_tensorrt_fp16_top10_matches_torch(tmp_path: Path) -> None:
    ok, reason = tensorrt_available()
    if not ok:
        pytest.skip(f"TensorRT is not available: {reason}")
    if not torch.cuda.is_available():
        pytest.skip("running the plans needs a CUDA GPU visible to torch")
    pytest.importorskip("tensorrt", reason="running the plans needs the tensorrt Python package")

    checkpoint = make_checkpoint(tmp_path / "checkpoint")
    onnx_files = export_onnx(checkpoint, tmp_path / "onnx")
    config = TensorRTConfig(fp16=True, max_batch=32, max_len=64, max_candidates=256, opt_len=32, opt_candidates=200)
    plans = build_engines(onnx_files, tmp_path / "plans", config)
    prefill, scorer = Engine(plans.prefill), Engine(plans.scorer)
    reference = TorchRuntime(checkpoint)

    rng = np.random.default_rng(0)
    agree = total = 0
    for batch in (1, 8, 32, 32, 32):
        length = int(rng.integers(1, 65))
        items = rng.integers(1, NUM_ITEMS + 1, (batch, length))
        timestamps = 1_000_000_000 + np.cumsum(rng.integers(0, 10**7, (batch, length)), axis=1)
        actions = rng.integers(0, NUM_ACTIONS, (batch, length))
        lengths = rng.integers(1, length + 1, batch)
        lengths[0] = length
        candidates = np.stack([rng.choice(NUM_ITEMS, NUM_CANDIDATES, replace=False) + 1 for _ in range(batch)])

        cache = reference.prefill(items, timestamps, actions, lengths)
        want = reference.score(cache.keys, cache.values, timestamps, lengths, cache.user, candidates)
        history = {"items": items, "timestamps": timestamps, "actions": actions, "lengths": lengths}
        keys, values, user = prefill(history, names(PREFILL_OUTPUTS))  # cache is batch-first in the plans
        cached = {"keys": keys, "values": values, "timestamps": timestamps, "lengths": lengths, "user": user}
        (got,) = scorer({**cached, "candidates": candidates}, names(SCORER_OUTPUTS))

        top_want = np.argsort(-want, axis=1)[:, :TOP_K]
        top_got = np.argsort(-got, axis=1)[:, :TOP_K]
        agree += sum(set(a) == set(b) for a, b in zip(top_want, top_got, strict=True))
        total += batch
    assert agree / total >= 0.95, f"same top-{TOP_K} on {agree}/{total} users"


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
