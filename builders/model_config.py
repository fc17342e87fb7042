"""One typed description per served model, rendered as Triton's own ``ModelConfig`` protobuf.

config.pbtxt is never a pasted string: the builders describe each model with these frozen
dataclasses, ``to_model_config`` turns the description into the protobuf that Triton parses, and
protobuf's ``text_format`` writes it. A typo in a field name is then an error here, not a model that
silently fails to load on the server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from genrec.client import protocol

CONFIG_FILENAME = "config.pbtxt"


def _data_type(dtype: str) -> int:
    """Triton's enum value for a dtype name as the client API spells it ('BYTES' is TYPE_STRING)."""
    enum_name = "TYPE_STRING" if dtype == "BYTES" else f"TYPE_{dtype}"
    if enum_name not in model_config_pb2.DataType.DESCRIPTOR.values_by_name or dtype == "STRING":
        raise ValueError(
            f"unknown Triton dtype {dtype!r}; expected one of INT64, INT32, FP32, FP16, BOOL, BYTES"
        )
    return model_config_pb2.DataType.Value(enum_name)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output; ``dims`` are per request, without the batch dimension (-1 = variable)."""

    name: str
    dtype: str  # INT64, INT32, FP32, BOOL, BYTES, ...
    dims: tuple[int, ...]
    allow_ragged_batch: bool = False  # requests of different lengths may share a batch (inputs only)
    optional: bool = False  # the request may omit it (inputs only)

    def __post_init__(self) -> None:
        _data_type(self.dtype)
        if not self.dims or any(d < -1 or d == 0 for d in self.dims):
            raise ValueError(f"tensor {self.name!r}: dims must be positive or -1, got {self.dims}")


@dataclass(frozen=True)
class DynamicBatching:
    max_queue_delay_us: int = 100  # how long a request may wait for others to batch with
    preferred_batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class InstanceGroup:
    count: int = 1
    kind: str = "KIND_CPU"  # KIND_CPU, KIND_GPU, KIND_AUTO, KIND_MODEL

    def __post_init__(self) -> None:
        if self.kind not in model_config_pb2.ModelInstanceGroup.Kind.DESCRIPTOR.values_by_name:
            raise ValueError(f"unknown instance group kind {self.kind!r}")


@dataclass(frozen=True)
class ModelSpec:
    """A model run by a backend: every genrec model is a Python-backend model (the onnx and tensorrt runtimes
    run inside it), so that each validates its own input (contract 5)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int  # 0 = the model takes no batch dimension
    backend: str = "python"
    dynamic_batching: DynamicBatching | None = None
    instance_groups: tuple[InstanceGroup, ...] = ()
    parameters: Mapping[str, str] = field(default_factory=dict)  # read by model.py at initialize
    version_policy_latest: int | None = 1  # serve the newest N versions; None = every version


@dataclass(frozen=True)
class EnsembleStep:
    """One composing model; the maps go from the step's tensor names to the ensemble's."""

    model_name: str
    input_map: Mapping[str, str]  # step input -> ensemble tensor
    output_map: Mapping[str, str]  # step output -> ensemble tensor
    model_version: int = -1  # -1: the newest loaded version; a build pins its own, so no request mixes two


@dataclass(frozen=True)
class EnsembleSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    steps: tuple[EnsembleStep, ...]


def tensor_from_protocol(
    t: protocol.Tensor, *, allow_ragged_batch: bool = False, optional: bool = False
) -> TensorSpec:
    """The served API's tensor as a config tensor, so configs and client share one definition."""
    return TensorSpec(t.name, t.dtype, t.dims, allow_ragged_batch=allow_ragged_batch, optional=optional or t.optional)


def _model_input(t: TensorSpec) -> model_config_pb2.ModelInput:
    return model_config_pb2.ModelInput(
        name=t.name,
        data_type=_data_type(t.dtype),
        dims=list(t.dims),
        allow_ragged_batch=t.allow_ragged_batch,
        optional=t.optional,
    )


def _model_output(t: TensorSpec) -> model_config_pb2.ModelOutput:
    if t.allow_ragged_batch or t.optional:
        raise ValueError(f"output {t.name!r}: allow_ragged_batch and optional apply to inputs only")
    return model_config_pb2.ModelOutput(name=t.name, data_type=_data_type(t.dtype), dims=list(t.dims))


def to_model_config(spec: ModelSpec | EnsembleSpec) -> model_config_pb2.ModelConfig:
    config = model_config_pb2.ModelConfig(
        name=spec.name,
        max_batch_size=spec.max_batch_size,
        input=[_model_input(t) for t in spec.inputs],
        output=[_model_output(t) for t in spec.outputs],
    )
    if isinstance(spec, EnsembleSpec):
        config.platform = "ensemble"
        for step in spec.steps:
            config.ensemble_scheduling.step.add(
                model_name=step.model_name,
                model_version=step.model_version,
                input_map=dict(step.input_map),
                output_map=dict(step.output_map),
            )
        return config

    config.backend = spec.backend
    if spec.dynamic_batching is not None:
        config.dynamic_batching.max_queue_delay_microseconds = spec.dynamic_batching.max_queue_delay_us
        config.dynamic_batching.preferred_batch_size.extend(spec.dynamic_batching.preferred_batch_sizes)
    for group in spec.instance_groups:
        config.instance_group.add(
            count=group.count, kind=model_config_pb2.ModelInstanceGroup.Kind.Value(group.kind)
        )
    for key, value in spec.parameters.items():
        config.parameters[key].string_value = value
    if spec.version_policy_latest is None:
        config.version_policy.all.SetInParent()
    else:
        config.version_policy.latest.num_versions = spec.version_policy_latest
    return config


def write_config(spec: ModelSpec | EnsembleSpec, model_dir: Path) -> Path:
    """Write ``model_dir/config.pbtxt`` (creating ``model_dir``) and return its path."""
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / CONFIG_FILENAME
    path.write_text(text_format.MessageToString(to_model_config(spec)))
    return path


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
