"""Fixtures of the client tests: real Triton protobuf responses and a stub Triton gRPC server.

The stub speaks Triton's real gRPC service (`service_pb2_grpc`) in-process, so the tests exercise
the whole client path (request encoding, gRPC, status codes, retries, decoding) without a
tritonserver. It checks every request against `protocol` and answers like a toy recommender:
catalog ids 1..CATALOG, a model maximum of MAX_LEN events, a retrieval depth of DEPTH
(all three are attributes of the `stub` fixture).
The end-to-end tests against a real tritonserver live elsewhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import ClassVar

import grpc
import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from genrec.client import protocol

CATALOG = 1000
MAX_LEN = 8
DEPTH = 50


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


@dataclass
class SeenInput:
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass
class StubTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """What the next requests meet (failures, delay) and what the requests were."""

    CATALOG: ClassVar[int] = CATALOG
    MAX_LEN: ClassVar[int] = MAX_LEN
    DEPTH: ClassVar[int] = DEPTH

    failures: list[grpc.StatusCode] = field(default_factory=list)  # popped one per request
    delay_s: float = 0.0
    live: bool = True
    ready_models: set[str] = field(default_factory=lambda: set(protocol.ENDPOINTS))
    requests: list[tuple[str, dict[str, SeenInput]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.failures.clear()
            self.delay_s = 0.0
            self.live = True
            self.ready_models = set(protocol.ENDPOINTS)
            self.requests.clear()

    def ServerLive(self, request, context):  # noqa: N802 (gRPC method name)
        return service_pb2.ServerLiveResponse(live=self.live)

    def ModelReady(self, request, context):  # noqa: N802
        if request.name not in protocol.ENDPOINTS:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{request.name}'")
        return service_pb2.ModelReadyResponse(ready=request.name in self.ready_models)

    def ModelInfer(self, request, context):  # noqa: N802
        seen = {
            t.name: SeenInput(
                t.datatype,
                tuple(t.shape),
                np.frombuffer(raw, dtype=triton_to_np_dtype(t.datatype)).reshape(tuple(t.shape)),
            )
            for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        }
        with self.lock:
            self.requests.append((request.model_name, seen))
            failure = self.failures.pop(0) if self.failures else None
        if self.delay_s:
            time.sleep(self.delay_s)
        if failure is not None:
            context.abort(failure, f"stub failure {failure.name}")
        endpoint = protocol.ENDPOINTS.get(request.model_name)
        if endpoint is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{request.model_name}'")
        problem = _protocol_problem(endpoint, seen, [o.name for o in request.outputs])
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        inputs = {name: got.data[0] for name, got in seen.items()}  # (1, n) -> (n,)
        if endpoint.model != protocol.RANK and int(inputs[protocol.K][0]) > DEPTH:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"k={int(inputs[protocol.K][0])} exceeds the retrieval depth {DEPTH}",
            )
        return infer_response(endpoint.model, _answer(endpoint.model, inputs))


def _protocol_problem(endpoint: protocol.Endpoint, seen: dict[str, SeenInput], outputs: list[str]) -> str:
    if list(seen) != [t.name for t in endpoint.inputs]:
        return f"inputs {list(seen)}, expected {[t.name for t in endpoint.inputs]}"
    if outputs != [t.name for t in endpoint.outputs]:
        return f"requested outputs {outputs}, expected {[t.name for t in endpoint.outputs]}"
    for tensor in endpoint.inputs:
        got = seen[tensor.name]
        if got.datatype != tensor.dtype or len(got.shape) != 2 or got.shape[0] != 1:
            return f"{tensor.name}: {got.datatype} {list(got.shape)}, expected {tensor.dtype} [1, ...]"
    lengths = {seen[t.name].shape[1] for t in protocol.HISTORY_INPUTS}
    return "" if len(lengths) == 1 else f"history inputs of different lengths {sorted(lengths)}"


def _answer(model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The toy model: unknown ids ignored, oldest events beyond MAX_LEN dropped."""
    history = inputs[protocol.HISTORY_ITEM_IDS]
    known = history[(history >= 1) & (history <= CATALOG)]
    report = {
        protocol.NUM_UNKNOWN: np.array([history.size - known.size], dtype=np.int32),
        protocol.NUM_TRUNCATED: np.array([max(0, history.size - MAX_LEN)], dtype=np.int32),
    }
    if model == protocol.RANK:
        candidates = inputs[protocol.CANDIDATE_ITEM_IDS]
        return {protocol.SCORES: (candidates % 7).astype(np.float32), **report}
    k = int(inputs[protocol.K][0])
    seen = set(known[-MAX_LEN:].tolist()) if bool(inputs[protocol.EXCLUDE_SEEN][0]) else set()
    ids = np.array([i for i in range(1, DEPTH + MAX_LEN + 1) if i not in seen][:k], dtype=np.int64)
    scores = np.linspace(1.0, 0.5, ids.size, dtype=np.float32) * (2.0 if model == protocol.RETRIEVE else 1.0)
    return {protocol.ITEM_IDS: ids, protocol.SCORES: scores.astype(np.float32), **report}


@pytest.fixture(scope="session")
def _stub_server() -> Iterator[tuple[StubTriton, str]]:
    servicer = StubTriton()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def stub(_stub_server: tuple[StubTriton, str]) -> Iterator[StubTriton]:
    servicer, _ = _stub_server
    servicer.reset()
    yield servicer
    servicer.reset()


@pytest.fixture
def stub_url(_stub_server: tuple[StubTriton, str], stub: StubTriton) -> str:
    return _stub_server[1]
