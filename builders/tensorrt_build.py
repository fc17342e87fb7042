"""The exported ONNX graphs -> TensorRT plans (fp16) with one optimisation profile over batch, history length and
candidate count, run by the served Python-backend models through the TensorRT runtime. Needs a CUDA GPU and TensorRT 10 (the Python API, or
``trtexec`` on PATH); a plan only runs on the TensorRT version and GPU family that built it.

fp16 keeps one island in fp32: HSTU's relative time bias takes log(time gap in seconds), and gaps beyond
65504 s (18 hours) overflow fp16, so every float node computed from an int64 -> float cast (cast, log, divide)
is pinned to fp32 before the result goes back to an integer bucket id.

``TensorRTRuntime`` serves the two plans through the ``Runtime`` protocol (the Python backend's path); the
tensorrt Python package is imported only when a plan is built or loaded, so this module imports without it.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto

from genrec.builders.onnx_export import (
    BATCH,
    CANDIDATES,
    HISTORY,
    PREFILL_INPUTS,
    PREFILL_OUTPUTS,
    SCORER_INPUTS,
    SCORER_OUTPUTS,
    OnnxFiles,
    OnnxTensor,
)
from genrec.builders.runtimes import Prefilled

Shape = tuple[int, ...]
PREFILL_PLAN, SCORER_PLAN = "prefill.plan", "scorer.plan"


@dataclass(frozen=True)
class TensorRTConfig:
    """Profile bounds (min is 1 on every dynamic axis); opt is the size TensorRT tunes its kernels for."""

    fp16: bool = True
    max_batch: int = 64
    max_len: int = 200  # the model's max_len: longer histories are truncated before they reach the engine
    max_candidates: int = 512
    opt_batch: int = 8
    opt_len: int = 50
    opt_candidates: int = 100

    def __post_init__(self) -> None:
        for axis, opt, top in (
            ("batch", self.opt_batch, self.max_batch),
            ("len", self.opt_len, self.max_len),
            ("candidates", self.opt_candidates, self.max_candidates),
        ):
            if not 1 <= opt <= top:
                raise ValueError(f"TensorRTConfig: need 1 <= opt_{axis} ({opt}) <= max_{axis} ({top})")

    def axis_range(self, axis: str) -> tuple[int, int, int]:
        """(min, opt, max) of a dynamic axis."""
        return {
            BATCH: (1, self.opt_batch, self.max_batch),
            HISTORY: (1, self.opt_len, self.max_len),
            CANDIDATES: (1, self.opt_candidates, self.max_candidates),
        }[axis]


@dataclass(frozen=True)
class EngineFiles:
    prefill: Path
    scorer: Path


def _python_api() -> tuple[bool, str]:
    try:
        import tensorrt as trt

        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except ImportError as error:
        return False, f"the tensorrt Python package is not importable ({error})"
    except Exception as error:  # no CUDA device or driver: TensorRT raises from its C++ factory
        return False, f"tensorrt cannot create a builder ({error})"
    if builder is None:
        return False, f"tensorrt {trt.__version__} cannot create a builder (no CUDA GPU?)"
    return True, f"tensorrt {trt.__version__} Python API"


def tensorrt_available() -> tuple[bool, str]:
    """Whether engines can be built here, and how (or why not)."""
    ok, reason = _python_api()
    if ok:
        return ok, reason
    trtexec = shutil.which("trtexec")
    if trtexec is not None:
        return True, f"trtexec at {trtexec}"
    return False, f"{reason}, and trtexec is not on PATH"


def profile_shapes(path: Path, specs: Sequence[OnnxTensor], config: TensorRTConfig) -> dict[str, tuple[Shape, ...]]:
    """Input name -> (min, opt, max) shapes: dynamic axes from the config, fixed ones from the ONNX graph
    (so the keys/values profiles follow the history length and keep the model's layers/heads/widths)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    static = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    shapes = {}
    for spec in specs:
        if any(axis is None and not static[spec.name][i] for i, axis in enumerate(spec.axes)):
            raise ValueError(f"{path}: input {spec.name!r} has an unknown fixed size {static[spec.name]}")
        dims = [config.axis_range(axis) if axis else (static[spec.name][i],) * 3 for i, axis in enumerate(spec.axes)]
        shapes[spec.name] = tuple(tuple(d[k] for d in dims) for k in range(3))
    return shapes


def fp32_nodes(path: Path) -> list[str]:
    """ONNX nodes with a float output computed from an integer -> float cast (the time-gap arithmetic)."""
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    types.update({init.name: init.data_type for init in graph.initializer})
    pinned: set[str] = set()
    names = []
    for node in graph.node:
        floats = [o for o in node.output if types.get(o) in (TensorProto.FLOAT, TensorProto.FLOAT16)]
        from_int = node.op_type == "Cast" and types.get(node.input[0]) in (TensorProto.INT32, TensorProto.INT64)
        if floats and (from_int or any(i in pinned for i in node.input)):
            names.append(node.name)
            pinned.update(floats)
    return names


def _build_python(onnx_path: Path, plan: Path, shapes: dict[str, tuple[Shape, ...]], fp16: bool) -> None:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])  # explicit batch: the only mode from 10, a flag before
    network = builder.create_network(0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise RuntimeError(
                f"tensorrt {trt.__version__} has no FP16 builder flag (TensorRT 11 builds strongly typed networks): "
                "convert the ONNX to mixed precision first (ModelOpt AutoCast) or build with fp16=False"
            )
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        _pin_fp32(network, trt)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_path} (its log above says why)")
    with open(plan, "wb") as f:
        f.write(serialized)


def _pin_fp32(network: Any, trt: Any) -> None:
    """The same rule as ``fp32_nodes`` on TensorRT's layers (no reliance on how the parser names them)."""
    ints = (trt.int32, getattr(trt, "int64", trt.int32))
    floats = (trt.float32, trt.float16)
    pinned: set[str] = set()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        inputs = [t for t in (layer.get_input(j) for j in range(layer.num_inputs)) if t is not None]
        from_int = bool(inputs) and all(t.dtype in ints for t in inputs)
        outputs = [k for k in range(layer.num_outputs) if layer.get_output(k).dtype in floats]
        if outputs and (from_int or any(t.name in pinned for t in inputs)):
            layer.precision = trt.float32
            for k in outputs:
                layer.set_output_type(k, trt.float32)
                pinned.add(layer.get_output(k).name)


def _build_trtexec(onnx_path: Path, plan: Path, shapes: dict[str, tuple[Shape, ...]], fp16: bool) -> None:
    def flag(k: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, s[k]))}" for name, s in shapes.items())

    command = [
        "trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan}", "--skipInference",
        f"--minShapes={flag(0)}", f"--optShapes={flag(1)}", f"--maxShapes={flag(2)}",
    ]  # fmt: skip
    pinned = fp32_nodes(onnx_path) if fp16 else []
    if fp16:
        command.append("--fp16")
    if pinned:  # trtexec names layers after their ONNX nodes
        command += [
            "--precisionConstraints=obey",
            "--layerPrecisions=" + ",".join(f"{name}:fp32" for name in pinned),
            "--layerOutputTypes=" + ",".join(f"{name}:fp32" for name in pinned),
        ]
    plan.unlink(missing_ok=True)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not plan.exists():
        log = (result.stdout + result.stderr)[-4000:]
        raise RuntimeError(f"trtexec failed to build {onnx_path} (exit {result.returncode}):\n{log}")


def build_engines(onnx: OnnxFiles, out_dir: Path, config: TensorRTConfig | None = None) -> EngineFiles:
    """Build ``prefill.plan`` and ``scorer.plan`` from the exported graphs (see ``export_onnx``)."""
    config = config or TensorRTConfig()
    ok, reason = tensorrt_available()
    if not ok:
        raise RuntimeError(f"TensorRT is not available: {reason}")
    build = _build_python if _python_api()[0] else _build_trtexec
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = EngineFiles(out_dir / PREFILL_PLAN, out_dir / SCORER_PLAN)
    for source, specs, plan in ((onnx.prefill, PREFILL_INPUTS, files.prefill), (onnx.scorer, SCORER_INPUTS, files.scorer)):
        build(source, plan, profile_shapes(source, specs, config), config.fp16)
    return files


# ---- the TensorRT Runtime ----------------------------------------------------------------------------------


class _Plan:
    """One deserialized plan, its single execution context and its I/O bindings (TensorRT 10 tensor API)."""

    def __init__(
        self,
        trt: Any,
        runtime: Any,
        path: Path,
        inputs: Sequence[OnnxTensor],
        outputs: Sequence[OnnxTensor],
        device: torch.device,
    ) -> None:
        self.path, self.inputs, self.outputs, self.device = path, tuple(inputs), tuple(outputs), device
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(
                f"TensorRT {trt.__version__} cannot deserialize {path}: a plan only runs on the TensorRT version "
                "and GPU family that built it (rebuild the repository here)"
            )
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"TensorRT cannot create an execution context for {path} (out of GPU memory?)")
        io = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        for specs, mode in ((self.inputs, trt.TensorIOMode.INPUT), (self.outputs, trt.TensorIOMode.OUTPUT)):
            for spec in specs:
                if spec.name not in io or self.engine.get_tensor_mode(spec.name) != mode:
                    raise RuntimeError(f"{path}: the engine has no {mode} tensor {spec.name!r} (it has {sorted(io)})")
        # The engine's own types: an int64 graph input may have become INT32 (TensorRT < 10 has no INT64).
        self.dtypes = {spec.name: _torch_dtype(trt, self.engine.get_tensor_dtype(spec.name)) for spec in (*inputs, *outputs)}
        # The profile's bounds on each dynamic axis (the tightest over the inputs that carry it).
        self.bounds: dict[str, tuple[int, int]] = {}
        for spec in self.inputs:
            low, _, high = (tuple(s) for s in self.engine.get_tensor_profile_shape(spec.name, 0))
            for i, axis in enumerate(spec.axes):
                if axis is not None:
                    old = self.bounds.get(axis, (1, high[i]))
                    self.bounds[axis] = (max(old[0], low[i]), min(old[1], high[i]))
        self.stream = torch.cuda.Stream(device=device)
        self.lock = threading.Lock()

    def limit(self, axis: str) -> int:
        return self.bounds[axis][1]

    def _check(self, arrays: Sequence[np.ndarray]) -> None:
        for spec, array in zip(self.inputs, arrays, strict=True):
            if array.ndim != len(spec.axes):
                raise ValueError(f"{self.path.name}: input {spec.name!r} needs {len(spec.axes)} dims, got {array.shape}")
            for size, axis in zip(array.shape, spec.axes, strict=True):
                if axis is None or axis == BATCH:
                    continue  # fixed sizes are TensorRT's to check; the batch is split into chunks
                low, high = self.bounds[axis]
                if not low <= size <= high:
                    raise ValueError(
                        f"{self.path.name}: input {spec.name!r} has {axis} size {size}, outside {low}..{high} of "
                        f"the engine's optimisation profile (rebuild the engines with larger TensorRTConfig limits)"
                    )

    def __call__(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Batch-first numpy inputs in spec order -> numpy outputs in spec order (float32 where the spec says
        so); a batch above the profile's max runs as chunks of that max."""
        self._check(arrays)
        batch = arrays[0].shape[0]
        if batch == 0:
            raise ValueError(f"{self.path.name}: empty batch")
        step = self.limit(BATCH)
        chunks = [self._run([a[start : start + step] for a in arrays]) for start in range(0, batch, step)]
        return [np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0] for parts in zip(*chunks, strict=True)]

    def _run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        with self.lock, torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            # Every copy, the engine and the copies back are queued on self.stream, in that order.
            inputs = []
            for spec, array in zip(self.inputs, arrays, strict=True):
                host = torch.from_numpy(np.ascontiguousarray(array, dtype=spec.dtype))
                tensor = host.to(self.device).to(self.dtypes[spec.name]).contiguous()
                if not self.context.set_input_shape(spec.name, tuple(tensor.shape)):
                    raise ValueError(f"{self.path.name}: TensorRT rejects shape {tuple(tensor.shape)} for {spec.name!r}")
                self.context.set_tensor_address(spec.name, tensor.data_ptr())
                inputs.append(tensor)
            outputs = []
            for spec in self.outputs:
                shape = tuple(self.context.get_tensor_shape(spec.name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"{self.path.name}: output {spec.name!r} has an unresolved shape {shape}")
                tensor = torch.empty(shape, dtype=self.dtypes[spec.name], device=self.device)
                self.context.set_tensor_address(spec.name, tensor.data_ptr())
                outputs.append(tensor)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run {self.path} (its log says why)")
            results = [t.to(getattr(torch, spec.dtype)).cpu() for spec, t in zip(self.outputs, outputs, strict=True)]
            self.stream.synchronize()  # the inputs stay referenced until here
            del inputs
        return [r.numpy() for r in results]


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}  # fmt: skip
    for name in ("int64", "bfloat16", "uint8"):
        if hasattr(trt, name):
            table[getattr(trt, name)] = getattr(torch, name)
    if dtype not in table:
        raise RuntimeError(f"TensorRT I/O type {dtype} has no torch equivalent here")
    return table[dtype]


class TensorRTRuntime:
    """The ``Runtime`` protocol on the two TensorRT plans (see ``build_engines``), on one CUDA GPU.

    Same semantics as ``OnnxRuntime``: the plans take and return the exported graphs' batch-first tensors,
    the cache in the protocol's (B, layers, L, H, d). Batches above the plans'
    profile max run as chunks of that max, candidate lists above it as chunks of candidates (each candidate
    is scored on its own); a history longer than the profile's max length is an error (the served models
    truncate histories to the model's max_len, which the engines are built for).
    """

    def __init__(self, directory: Path, device: str = "cuda") -> None:
        directory = Path(directory)
        files = EngineFiles(directory / PREFILL_PLAN, directory / SCORER_PLAN)
        for path in (files.prefill, files.scorer):
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing; write it with build_engines(onnx_files, {directory})")
        try:
            import tensorrt as trt
        except ImportError as error:
            raise RuntimeError(f"the tensorrt runtime needs the tensorrt Python package ({error})") from error
        if not torch.cuda.is_available():
            raise RuntimeError("the tensorrt runtime needs a CUDA GPU visible to torch")
        self.device = torch.device(device if device.startswith("cuda") else "cuda")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)  # outlives the engines it deserializes
        with torch.cuda.device(self.device):
            self.prefill_plan = _Plan(trt, self.runtime, files.prefill, PREFILL_INPUTS, PREFILL_OUTPUTS, self.device)
            self.scorer_plan = _Plan(trt, self.runtime, files.scorer, SCORER_INPUTS, SCORER_OUTPUTS, self.device)

    def prefill(self, items: np.ndarray, timestamps: np.ndarray, actions: np.ndarray, lengths: np.ndarray) -> Prefilled:
        """items/timestamps/actions (B, L) int64 right-padded, lengths (B,) int64."""
        keys, values, user = self.prefill_plan((items, timestamps, actions, lengths))
        return Prefilled(keys, values, user)

    def score(self, cache: Prefilled, timestamps: np.ndarray, lengths: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """A `Prefilled` cache (K/V (B, layers, L, H, d), user (B, D)), its timestamps (B, L) and lengths (B,),
        candidates (B, C) dense ids -> (B, C) float32 served scores (task 0)."""
        batch_first = (cache.keys, cache.values, timestamps, lengths, cache.user)
        step = self.scorer_plan.limit(CANDIDATES)
        parts = [
            self.scorer_plan((*batch_first, candidates[:, start : start + step]))[0]
            for start in range(0, max(candidates.shape[1], 1), step)
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
