"""Fixtures of the client tests: real Triton protobuf responses, built in-process.

Everything that needs a server (the clients over gRPC, genrec-client against a server) runs against
a real tritonserver in tests/server/test_client_e2e.py.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import np_to_triton_dtype


def infer_response(model: str, outputs: dict[str, np.ndarray]) -> service_pb2.ModelInferResponse:
    """A real ModelInferResponse holding each output (n,) as [1, n], raw contents like Triton's."""
    response = service_pb2.ModelInferResponse(model_name=model, model_version="1")
    for name, array in outputs.items():
        batched = np.ascontiguousarray(array).reshape(1, -1)  # (n,) -> (1, n)
        response.outputs.add(name=name, datatype=np_to_triton_dtype(batched.dtype), shape=list(batched.shape))
        response.raw_output_contents.append(batched.tobytes())
    return response


@pytest.fixture
def make_result() -> Callable[..., InferResult]:
    def make(model: str, outputs: dict[str, np.ndarray]) -> InferResult:
        return InferResult(infer_response(model, outputs))

    return make
