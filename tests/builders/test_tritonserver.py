"""A real tritonserver serving a tiny repository: two Python-backend models wired by an ensemble."""

import os
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from genrec.builders.model_config import (
    DynamicBatching,
    EnsembleSpec,
    EnsembleStep,
    InstanceGroup,
    ModelSpec,
    TensorSpec,
    write_config,
)
from genrec.builders.tritonserver import (
    SHM_REGION_PREFIX,
    ServerConfig,
    ServerError,
    TritonServer,
    find_perf_analyzer,
    free_ports,
    group_members,
    serve,
)

# y = x * multiply + add, with the constants from the config's parameters; it also logs which numpy
# the stub imported, so the test can check that the virtualenv's packages are the ones in use.
AFFINE_MODEL_PY = """
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"])["parameters"]
        self.multiply = int(parameters["multiply"]["string_value"])
        self.add = int(parameters["add"]["string_value"])
        pb_utils.Logger.log_info(f"numpy {np.__version__} from {np.__file__}")

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            y = pb_utils.Tensor("y", x * self.multiply + self.add)
            responses.append(pb_utils.InferenceResponse(output_tensors=[y]))
        return responses
"""

FAILING_MODEL_PY = """
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("weights are missing")

    def execute(self, requests):
        return []
"""

ENSEMBLE = "add_one_then_double"
MAX_BATCH = 8


def _affine_model(repository: Path, name: str, multiply: int, add: int) -> None:
    spec = ModelSpec(
        name=name,
        inputs=(TensorSpec("x", "INT64", (-1,), allow_ragged_batch=True),),
        outputs=(TensorSpec("y", "INT64", (-1,)),),
        max_batch_size=MAX_BATCH,
        # A long window so that the concurrent requests below are batched together.
        dynamic_batching=DynamicBatching(max_queue_delay_us=20_000),
        instance_groups=(InstanceGroup(count=1, kind="KIND_CPU"),),
        parameters={"multiply": str(multiply), "add": str(add)},
    )
    write_config(spec, repository / name)
    (repository / name / "1").mkdir()
    (repository / name / "1" / "model.py").write_text(AFFINE_MODEL_PY)


def _build_repository(repository: Path) -> None:
    _affine_model(repository, "add_one", multiply=1, add=1)
    _affine_model(repository, "double", multiply=2, add=0)
    ensemble = EnsembleSpec(
        name=ENSEMBLE,
        inputs=(TensorSpec("values", "INT64", (-1,)),),
        outputs=(TensorSpec("result", "INT64", (-1,)),),
        max_batch_size=MAX_BATCH,
        steps=(
            EnsembleStep("add_one", input_map={"x": "values"}, output_map={"y": "plus_one"}),
            EnsembleStep("double", input_map={"x": "plus_one"}, output_map={"y": "result"}),
        ),
    )
    write_config(ensemble, repository / ENSEMBLE)
    (repository / ENSEMBLE / "1").mkdir()  # an ensemble needs a version folder, even empty


def _config(repository: Path, tmp: Path) -> ServerConfig:
    grpc_port, http_port, metrics_port = free_ports(3)
    return ServerConfig(
        repository=repository,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        log_file=tmp / "tritonserver.log",
    )


def _is_running(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    tmp = tmp_path_factory.mktemp("triton")
    _build_repository(tmp / "repository")
    with TritonServer(_config(tmp / "repository", tmp)) as running:
        yield running
    assert running.pid is not None and not _is_running(running.pid)


def _infer(url: str, values: np.ndarray, model: str = ENSEMBLE) -> np.ndarray:
    with grpcclient.InferenceServerClient(url) as client:
        request = grpcclient.InferInput("values", [1, len(values)], "INT64")
        request.set_data_from_numpy(values[None, :])
        result = client.infer(model, [request], outputs=[grpcclient.InferRequestedOutput("result")])
        output = result.as_numpy("result")
        assert output is not None
        return output[0]


@pytest.mark.server
def test_ensemble_batches_requests_of_different_lengths(server: TritonServer) -> None:
    histories = [np.arange(n, dtype=np.int64) * 10 - 3 for n in range(1, 2 * MAX_BATCH + 1)]

    with ThreadPoolExecutor(max_workers=len(histories)) as pool:
        results = list(pool.map(lambda h: _infer(server.url, h), histories))

    for history, result in zip(histories, results, strict=True):
        assert result.dtype == np.int64
        np.testing.assert_array_equal(result, (history + 1) * 2)
    with grpcclient.InferenceServerClient(server.url) as client:
        stats = client.get_inference_statistics("add_one").model_stats[0]
    # Fewer executions than requests: the dynamic batcher grouped requests of different lengths.
    assert stats.inference_count >= len(histories)
    assert stats.execution_count < stats.inference_count


@pytest.mark.server
def test_stub_uses_the_virtualenvs_numpy(server: TritonServer) -> None:
    assert f"numpy {np.__version__} from {np.__file__}" in server.log_path.read_text()


@pytest.mark.server
def test_wrong_dtype_is_a_clear_error_and_the_server_stays_ready(server: TritonServer) -> None:
    with grpcclient.InferenceServerClient(server.url) as client:
        request = grpcclient.InferInput("values", [1, 3], "FP32")
        request.set_data_from_numpy(np.ones((1, 3), dtype=np.float32))
        with pytest.raises(InferenceServerException, match="values") as error:
            client.infer(ENSEMBLE, [request])
        assert "'FP32'" in str(error.value) and "expects 'INT64'" in str(error.value)
        assert client.is_server_ready()
    np.testing.assert_array_equal(_infer(server.url, np.array([4, 5], dtype=np.int64)), [10, 12])


@pytest.mark.server
def test_serve_forwards_sigint_and_the_server_is_gone(tmp_path: Path) -> None:
    _build_repository(tmp_path / "repository")
    seen: list[TritonServer] = []

    def interrupt(running: TritonServer) -> None:
        seen.append(running)
        np.testing.assert_array_equal(_infer(running.url, np.array([1], dtype=np.int64)), [4])
        os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C would

    def ours(signum: int, frame: object) -> None:
        raise AssertionError("serve's handler should have had the SIGINT")

    # a handler of our own beforehand, not the inherited one: a shell's background job starts with SIGINT ignored
    previous = signal.signal(signal.SIGINT, ours)
    try:
        assert serve(_config(tmp_path / "repository", tmp_path), ready_callback=interrupt) == 0
        assert signal.getsignal(signal.SIGINT) is ours  # put back as serve found it
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen[0].pid is not None and not _is_running(seen[0].pid)


def _stubs(pgid: int) -> dict[int, list[str]]:
    """The Python stubs of a server's process group -> the shared-memory regions on their command lines."""
    stubs = {}
    for pid in group_members(pgid):
        if pid != pgid:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            stubs[pid] = [a for a in args if a.startswith(SHM_REGION_PREFIX)]
    return stubs


@pytest.mark.server
def test_kill_9_of_the_server_under_serve_leaves_no_stub_and_no_shared_memory(tmp_path: Path) -> None:
    _build_repository(tmp_path / "repository")
    found: dict[int, list[str]] = {}

    seen_pid: list[int] = []

    def kill_9(running: TritonServer) -> None:
        assert running.pid is not None
        seen_pid.append(running.pid)
        found.update(_stubs(running.pid))
        os.kill(running.pid, signal.SIGKILL)

    assert serve(_config(tmp_path / "repository", tmp_path), ready_callback=kill_9) == -signal.SIGKILL
    assert len(found) == 2 and all(regions for regions in found.values())  # one stub per model instance
    assert not group_members(seen_pid[0])  # no live process is left of the server's group (zombies hold nothing)
    regions = {r for rs in found.values() for r in rs}
    assert not [r for r in regions if (Path("/dev/shm") / r).exists()]


@pytest.mark.server
def test_admin_protocols_need_the_key(server: TritonServer) -> None:
    """Without the key a caller cannot register shared memory (which read the stub's memory back), load or
    unload models, or change logging; inference, health and statistics stay open."""
    with grpcclient.InferenceServerClient(server.url) as client:
        refused = [
            lambda: client.register_system_shared_memory("stolen", "/triton_python_backend_shm_region_1", 64),
            lambda: client.get_model_repository_index(),
            lambda: client.unload_model(ENSEMBLE),
            lambda: client.update_log_settings({"log_verbose_level": 1}),
        ]
        for call in refused:
            with pytest.raises(InferenceServerException, match="restricted") as error:
                call()
            assert "genrec-admin-key" in str(error.value)
        assert client.is_server_ready() and client.get_inference_statistics(ENSEMBLE).model_stats
        index = client.get_model_repository_index(headers=server.admin_headers)
        assert {m.name for m in index.models} == {"add_one", "double", ENSEMBLE}
    np.testing.assert_array_equal(_infer(server.url, np.array([1], dtype=np.int64)), [4])


@pytest.mark.server
def test_a_model_that_fails_to_load_is_reported_with_the_log(tmp_path: Path) -> None:
    _affine_model(tmp_path / "repository", "broken", multiply=1, add=0)
    (tmp_path / "repository" / "broken" / "1" / "model.py").write_text(FAILING_MODEL_PY)
    server = TritonServer(_config(tmp_path / "repository", tmp_path))

    with pytest.raises(ServerError, match="exited with code") as error, server:
        pass

    assert "failed to load 'broken' version 1: Internal: RuntimeError: weights are missing" in str(
        error.value
    )
    assert server.pid is not None and not _is_running(server.pid)


def test_perf_analyzer_runs() -> None:
    executable, env = find_perf_analyzer()

    result = subprocess.run([executable, "--version"], env=env, capture_output=True, text=True, timeout=30)

    assert result.returncode == 0, result.stderr
    assert "Perf Analyzer Version 2.51" in result.stdout + result.stderr  # it prints to stderr
