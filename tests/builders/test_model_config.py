from collections.abc import Callable
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from genrec.builders.model_config import (
    DynamicBatching,
    EnsembleSpec,
    EnsembleStep,
    InstanceGroup,
    ModelSpec,
    TensorSpec,
    read_config,
    tensor_from_protocol,
    to_model_config,
    write_config,
)
from genrec.client import protocol

ENCODER = ModelSpec(
    name="user_encoder",
    inputs=(
        *(tensor_from_protocol(t, allow_ragged_batch=True) for t in protocol.HISTORY_INPUTS),
        TensorSpec("cache_hint", "BYTES", (1,), optional=True),
    ),
    outputs=(TensorSpec("user_embedding", "FP32", (64,)),),
    max_batch_size=16,
    dynamic_batching=DynamicBatching(max_queue_delay_us=500, preferred_batch_sizes=(4, 8)),
    instance_groups=(InstanceGroup(count=2, kind="KIND_CPU"),),
    parameters={"runtime": "torch"},
)

RETRIEVE = EnsembleSpec(
    name=protocol.RETRIEVE,
    inputs=tuple(tensor_from_protocol(t) for t in protocol.ENDPOINTS[protocol.RETRIEVE].inputs),
    outputs=tuple(tensor_from_protocol(t) for t in protocol.ENDPOINTS[protocol.RETRIEVE].outputs),
    max_batch_size=16,
    steps=(
        EnsembleStep(
            "user_encoder",
            input_map={t.name: t.name for t in protocol.HISTORY_INPUTS},
            output_map={"user_embedding": "embedding"},
        ),
        EnsembleStep(
            "item_retrieval",
            input_map={"user_embedding": "embedding", protocol.K: protocol.K},
            output_map={protocol.ITEM_IDS: protocol.ITEM_IDS, protocol.SCORES: protocol.SCORES},
        ),
    ),
)


@pytest.mark.parametrize("spec", [ENCODER, RETRIEVE], ids=lambda s: s.name)
def test_written_config_reads_back_as_the_same_protobuf(
    spec: ModelSpec | EnsembleSpec, tmp_path: Path
) -> None:
    path = write_config(spec, tmp_path / spec.name)

    assert path == tmp_path / spec.name / "config.pbtxt"
    assert read_config(path) == to_model_config(spec)
    # Read independently of read_config, as Triton does: the text is a valid ModelConfig.
    assert text_format.Parse(path.read_text(), model_config_pb2.ModelConfig()) == to_model_config(spec)


def test_model_fields() -> None:
    config = to_model_config(ENCODER)

    assert config.name == "user_encoder"
    assert config.backend == "python"
    assert config.platform == ""
    assert config.max_batch_size == 16
    assert [i.name for i in config.input] == [*(t.name for t in protocol.HISTORY_INPUTS), "cache_hint"]
    history = config.input[0]
    assert history.data_type == model_config_pb2.TYPE_INT64
    assert list(history.dims) == [-1]
    assert history.allow_ragged_batch and not history.optional
    assert config.input[3].data_type == model_config_pb2.TYPE_STRING
    assert config.input[3].optional
    assert config.output[0].data_type == model_config_pb2.TYPE_FP32
    assert list(config.output[0].dims) == [64]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (2, model_config_pb2.ModelInstanceGroup.KIND_CPU)
    ]
    assert config.parameters["runtime"].string_value == "torch"
    assert config.version_policy.latest.num_versions == 1


def test_ensemble_fields() -> None:
    config = to_model_config(RETRIEVE)

    assert config.platform == "ensemble"
    assert config.backend == ""
    assert not config.HasField("dynamic_batching")
    assert [s.model_name for s in config.ensemble_scheduling.step] == ["user_encoder", "item_retrieval"]
    encoder_step = config.ensemble_scheduling.step[0]
    assert encoder_step.model_version == -1
    assert dict(encoder_step.input_map)[protocol.HISTORY_ITEM_IDS] == protocol.HISTORY_ITEM_IDS
    assert dict(encoder_step.output_map) == {"user_embedding": "embedding"}
    assert [o.name for o in config.output] == [t.name for t in protocol.TOP_K_OUTPUTS]
    assert config.input[-1].data_type == model_config_pb2.TYPE_BOOL


def test_unbatched_model_and_every_version() -> None:
    spec = ModelSpec(
        "scorer",
        inputs=(TensorSpec("x", "FP32", (-1, 8)),),
        outputs=(TensorSpec("y", "FP32", (-1,)),),
        max_batch_size=0,
        version_policy_latest=None,
    )
    config = to_model_config(spec)

    assert config.backend == "python" and config.max_batch_size == 0
    assert config.version_policy.HasField("all")
    assert list(config.input[0].dims) == [-1, 8]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TensorSpec("x", "INT128", (1,)), "unknown Triton dtype 'INT128'"),
        (lambda: TensorSpec("x", "STRING", (1,)), "unknown Triton dtype 'STRING'"),
        (lambda: TensorSpec("x", "INT64", (0,)), "tensor 'x': dims"),
        (lambda: InstanceGroup(kind="KIND_TPU"), "KIND_TPU"),
        (
            lambda: to_model_config(ModelSpec("m", (), (TensorSpec("y", "FP32", (1,), optional=True),), 1)),
            "output 'y'",
        ),
    ],
)
def test_invalid_specs_are_rejected_with_the_offending_value(
    make: Callable[[], object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make()
