"""HSTU checkpoint -> two ONNX graphs (prefill, scorer), and the onnxruntime Runtime that serves them.

    prefill.onnx   history (B, L) -> per-layer K/V cache + user embedding
    scorer.onnx    K/V cache + candidates (B, C) -> one served score per candidate

Every tensor name and dynamic axis comes from the specs below (``PREFILL_INPUTS`` ... ``SCORER_OUTPUTS``);
the exporter, ``OnnxRuntime``, the TensorRT builder and the Triton configs all read them from here.
Every tensor is batch-first, as ONNX Runtime and TensorRT batch them and as the model keeps its cache: the
K/V is (B, layers, L, H, d) from the model through the graphs to the ``Runtime`` protocol. Both run inside the
Python-backend models, which validate every request first.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from genrec.builders.runtimes import Prefilled
from genrec.training.batch import SequenceBatch
from genrec.training.checkpoint import load_checkpoint
from genrec.training.hstu import HSTU, KVCache

BATCH, HISTORY, CANDIDATES = "batch", "history", "candidates"  # the dynamic axes


@dataclass(frozen=True)
class OnnxTensor:
    """One graph input or output. ``axes`` names each dimension: a dynamic axis name, or None where the
    size is fixed by the model config (layers, heads, widths)."""

    name: str
    dtype: str  # numpy dtype name: int64, float32
    axes: tuple[str | None, ...]

    def dynamic_axes(self) -> dict[int, str]:
        return {i: axis for i, axis in enumerate(self.axes) if axis is not None}


_CACHE = (BATCH, None, HISTORY, None, None)  # (B, layers, L, H, d)
PREFILL_INPUTS = (
    OnnxTensor("items", "int64", (BATCH, HISTORY)),  # dense ids, 0 = padding
    OnnxTensor("timestamps", "int64", (BATCH, HISTORY)),  # unix seconds
    OnnxTensor("actions", "int64", (BATCH, HISTORY)),  # 0 = unknown
    OnnxTensor("lengths", "int64", (BATCH,)),  # 1 <= lengths <= L
)
PREFILL_OUTPUTS = (
    OnnxTensor("keys", "float32", _CACHE),
    OnnxTensor("values", "float32", _CACHE),
    OnnxTensor("user", "float32", (BATCH, None)),  # L2-normalised
)
SCORER_INPUTS = (
    OnnxTensor("keys", "float32", _CACHE),
    OnnxTensor("values", "float32", _CACHE),
    OnnxTensor("timestamps", "int64", (BATCH, HISTORY)),
    OnnxTensor("lengths", "int64", (BATCH,)),
    OnnxTensor("user", "float32", (BATCH, None)),
    OnnxTensor("candidates", "int64", (BATCH, CANDIDATES)),  # dense ids
)
SCORER_OUTPUTS = (OnnxTensor("scores", "float32", (BATCH, CANDIDATES)),)

PREFILL_FILE, SCORER_FILE = "prefill.onnx", "scorer.onnx"


def names(specs: Sequence[OnnxTensor]) -> list[str]:
    return [spec.name for spec in specs]


@dataclass(frozen=True)
class OnnxFiles:
    prefill: Path
    scorer: Path

    @staticmethod
    def in_directory(directory: Path) -> OnnxFiles:
        return OnnxFiles(Path(directory) / PREFILL_FILE, Path(directory) / SCORER_FILE)


# ---- export wrappers: tensors in, tensors out ---------------------------------------------------------------


class PrefillExport(nn.Module):
    """HSTU.prefill without a cache, batch-first outputs."""

    def __init__(self, model: HSTU) -> None:
        super().__init__()
        self.model = model

    def forward(self, items: Tensor, timestamps: Tensor, actions: Tensor, lengths: Tensor) -> tuple[Tensor, ...]:
        """(B, L) int64 x3, (B,) int64 -> keys (B, layers, L, H, dqk), values (B, layers, L, H, dv), user (B, D)."""
        cache, user = self.model.prefill(SequenceBatch(items, timestamps, actions, lengths))
        return cache.keys, cache.values, user


class ScorerExport(nn.Module):
    """One chunk of HSTU.score_candidates (dynamic candidate axis), task 0, request time = last event's."""

    def __init__(self, model: HSTU) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, keys: Tensor, values: Tensor, timestamps: Tensor, lengths: Tensor, user: Tensor, candidates: Tensor
    ) -> Tensor:
        """keys/values (B, layers, L, H, d), timestamps (B, L), lengths (B,), user (B, D), candidates (B, C)
        -> scores (B, C) float32."""
        cache = KVCache(keys, values, timestamps, lengths)
        request_time = timestamps.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)  # (B,)
        return self.model.score_unchunked(cache, user, candidates, request_time)[..., 0]


# ---- export ------------------------------------------------------------------------------------------------


def _example_inputs(model: HSTU) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Prefill and scorer example inputs. Every dynamic size is distinct and > 1, so the tracer cannot
    confuse two axes or specialise one to a broadcastable 1."""
    config = model.config
    batch, history, candidates = 3, 7, 5
    generator = torch.Generator().manual_seed(0)
    items = torch.randint(1, config.num_items + 1, (batch, history), generator=generator)
    timestamps = 1_000_000 + torch.arange(history)[None, :].repeat(batch, 1) * 3600
    actions = torch.randint(0, config.num_actions, (batch, history), generator=generator)
    lengths = torch.tensor([history, 4, 2])
    prefill = (items, timestamps, actions, lengths)
    with torch.no_grad():
        keys, values, user = PrefillExport(model)(*prefill)
    cands = torch.randint(1, config.num_items + 1, (batch, candidates), generator=generator)
    return prefill, (keys, values, timestamps, lengths, user, cands)


def _export(
    module: nn.Module,
    args: tuple[Tensor, ...],
    inputs: Sequence[OnnxTensor],
    outputs: Sequence[OnnxTensor],
    path: Path,
    opset: int,
) -> None:
    import onnx  # the `train` extra: exporting is a build step, and served models need only onnxruntime

    # The TorchScript exporter: the dynamo exporter needs onnxscript, which this project does not depend on,
    # and the traced graph is fully dynamic because HSTU's cache-less prefill and scorer are shape-only.
    with torch.no_grad():
        results = module(*args)
    results = results if isinstance(results, tuple) else (results,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")  # our indices are >= 0
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=names(inputs),
            output_names=names(outputs),
            dynamic_axes={spec.name: spec.dynamic_axes() for spec in (*inputs, *outputs)},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    got = ([i.name for i in graph.input], [o.name for o in graph.output])
    if got != (names(inputs), names(outputs)):
        raise RuntimeError(f"{path}: graph tensors {got} differ from the spec {names(inputs), names(outputs)}")
    # The exporter's shape inference loses some fixed sizes (the user embedding's width comes out as
    # "Divuser_dim_1"): state every fixed size, so Triton and TensorRT see (B, D), not (B, ?).
    for spec, value, example in zip((*inputs, *outputs), (*graph.input, *graph.output), (*args, *results), strict=True):
        for dim, axis, size in zip(value.type.tensor_type.shape.dim, spec.axes, example.shape, strict=True):
            if axis is None:
                dim.dim_value = int(size)
            else:
                dim.dim_param = axis
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def export_onnx(checkpoint_dir: Path, out_dir: Path, opset: int = 17) -> OnnxFiles:
    """Write ``prefill.onnx`` and ``scorer.onnx`` for an HSTU checkpoint (fp32, dynamic batch/history/candidates)."""
    model, _ = load_checkpoint(checkpoint_dir, "cpu")
    if not isinstance(model, HSTU):
        raise ValueError(f"{checkpoint_dir}: only HSTU checkpoints export to ONNX (got {type(model).__name__})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = OnnxFiles.in_directory(out_dir)
    prefill_args, scorer_args = _example_inputs(model)
    _export(PrefillExport(model).eval(), prefill_args, PREFILL_INPUTS, PREFILL_OUTPUTS, files.prefill, opset)
    _export(ScorerExport(model).eval(), scorer_args, SCORER_INPUTS, SCORER_OUTPUTS, files.scorer, opset)
    return files


# ---- the onnxruntime Runtime --------------------------------------------------------------------------------


class OnnxRuntime:
    """The ``Runtime`` protocol on onnxruntime sessions over the two exported graphs.

    providers: onnxruntime execution providers in order of preference (default CPU); those this onnxruntime
    build lacks are skipped with a warning, and CPU is always the last resort.
    intra_op_threads: threads per session, 0 = onnxruntime's default (one per core).
    """

    def __init__(self, directory: Path, providers: Sequence[str] | None = None, intra_op_threads: int = 0) -> None:
        files = OnnxFiles.in_directory(directory)
        for path in (files.prefill, files.scorer):
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing; write it with export_onnx(checkpoint, {directory})")
        available = ort.get_available_providers()
        wanted = list(providers or ["CPUExecutionProvider"])
        missing = [p for p in wanted if p not in available]
        if missing:
            warnings.warn(f"onnxruntime providers {missing} are not available (have {available})", stacklevel=2)
        chosen = [p for p in wanted if p in available and p != "CPUExecutionProvider"] + ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        self.prefill_session = ort.InferenceSession(str(files.prefill), options, providers=chosen)
        self.scorer_session = ort.InferenceSession(str(files.scorer), options, providers=chosen)
        self.providers = self.prefill_session.get_providers()

    @staticmethod
    def _feed(specs: Sequence[OnnxTensor], arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        return {spec.name: np.ascontiguousarray(a, dtype=spec.dtype) for spec, a in zip(specs, arrays, strict=True)}

    def prefill(self, items: np.ndarray, timestamps: np.ndarray, actions: np.ndarray, lengths: np.ndarray) -> Prefilled:
        """items/timestamps/actions (B, L) int64 right-padded, lengths (B,) int64."""
        feed = self._feed(PREFILL_INPUTS, (items, timestamps, actions, lengths))
        keys, values, user = self.prefill_session.run(names(PREFILL_OUTPUTS), feed)
        return Prefilled(keys, values, user)

    def score(self, cache: Prefilled, timestamps: np.ndarray, lengths: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """A `Prefilled` cache (K/V (B, layers, L, H, d), user (B, D)), its timestamps (B, L) and lengths (B,),
        candidates (B, C) dense ids -> (B, C) float32 served scores (task 0)."""
        arrays = (cache.keys, cache.values, timestamps, lengths, cache.user, candidates)
        (scores,) = self.scorer_session.run(names(SCORER_OUTPUTS), self._feed(SCORER_INPUTS, arrays))
        return scores
