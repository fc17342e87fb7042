"""The exported ONNX graphs -> TensorRT plans (fp16) with one optimisation profile over batch, history length and
candidate count, for Triton's ``tensorrt_plan`` platform. Needs a CUDA GPU and TensorRT 10 (the Python API, or
``trtexec`` on PATH); a plan only runs on the TensorRT version and GPU family that built it.

fp16 keeps one island in fp32: HSTU's relative time bias takes log(time gap in seconds), and gaps beyond
65504 s (18 hours) overflow fp16, so every float node computed from an int64 -> float cast (cast, log, divide)
is pinned to fp32 before the result goes back to an integer bucket id.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from genrec.builders.onnx_export import (
    BATCH,
    CANDIDATES,
    HISTORY,
    PREFILL_INPUTS,
    SCORER_INPUTS,
    OnnxFiles,
    OnnxTensor,
)

Shape = tuple[int, ...]


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
    files = EngineFiles(out_dir / "prefill.plan", out_dir / "scorer.plan")
    for source, specs, plan in ((onnx.prefill, PREFILL_INPUTS, files.prefill), (onnx.scorer, SCORER_INPUTS, files.scorer)):
        build(source, plan, profile_shapes(source, specs, config), config.fp16)
    return files
