"""Find, start, wait for and stop a real tritonserver; find a runnable perf_analyzer.

Two installs are supported: a ``tritonserver`` on PATH (NVIDIA's container, backends in its default
/opt/tritonserver/backends) and the CPU build inside the ``nvidia-pytriton`` wheel. The wheel's
server needs some preparation before it runs from a plain virtualenv: its Python backend folder has
no stub for the running interpreter, its libraries sit in ``nvidia_pytriton.libs/``, and the stub
finds the virtualenv's packages only when the virtualenv's ``bin/`` is first on PATH.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

LOG_TAIL_LINES = 40
# Behind the admin key: what lets a caller read server memory (shared-memory registration), load code or
# unload models (model-repository), or change logging and tracing. Inference, health, metadata, model
# config and statistics stay open.
ADMIN_PROTOCOLS = ("shared-memory", "model-repository", "logging", "trace")
ADMIN_HEADER = "genrec-admin-key"  # HTTP header; gRPC metadata key: GRPC_ADMIN_HEADER
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"  # Triton prefixes restricted gRPC keys so


class ServerError(RuntimeError):
    """tritonserver could not be found, did not become ready, or exited."""


def cache_dir() -> Path:
    """Writable per-user folder for the prepared backend and library links (XDG convention)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "genrec"


def default_admin_key_file() -> Path:
    return cache_dir() / "admin-key"


def read_or_create_admin_key(path: Path) -> str:
    """The admin key kept in ``path``; a new random one, readable by this user only, if there is none."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24) + "\n")
    key = path.read_text().strip()
    if not key or any(c in key for c in ",:= \t"):
        raise ServerError(f"{path}: the admin key must be one word without ',', ':' or '='")
    return key


@dataclass(frozen=True)
class TritonInstall:
    """A runnable tritonserver and what its process needs on top of the current environment."""

    executable: Path
    backend_directory: Path | None  # None: the server's own default (/opt/tritonserver/backends)
    env: Mapping[str, str] = field(default_factory=dict)


def _pytriton_dir() -> Path | None:
    # Located without importing pytriton, whose import configures logging as a side effect.
    found = importlib.util.find_spec("pytriton")
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def _prepend_path(value: str, existing: str | None) -> str:
    return f"{value}{os.pathsep}{existing}" if existing else value


def _prepare_python_backend(pytriton_dir: Path) -> Path:
    """Copy the wheel's Python backend with the stub for this interpreter; return the backends folder.

    Idempotent and safe when several processes race: the folder is assembled under a temporary
    name and renamed into place, so a reader sees either nothing or a complete backend.
    """
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = (
        pytriton_dir / "tritonserver" / "python_backend_stubs" / python_version / "triton_python_backend_stub"
    )
    if not stub.is_file():
        raise ServerError(
            f"nvidia-pytriton has no Python backend stub for Python {python_version} (looked for {stub})"
        )
    tag = f"pytriton-{importlib.metadata.version('nvidia-pytriton')}-py{python_version}"
    backends = cache_dir() / "triton-backends" / tag
    if (backends / "python" / stub.name).is_file():
        return backends

    backends.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".python-", dir=backends))
    shutil.copytree(
        pytriton_dir / "tritonserver" / "backends" / "python",
        staging,
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy2(stub, staging / stub.name)
    try:
        staging.rename(backends / "python")
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(staging)
    return backends


def find_tritonserver() -> TritonInstall:
    """The ``tritonserver`` on PATH if there is one, else the one bundled in ``nvidia-pytriton``."""
    on_path = shutil.which("tritonserver")
    if on_path is not None:
        return TritonInstall(Path(on_path), backend_directory=None)

    pytriton_dir = _pytriton_dir()
    if pytriton_dir is None or not (pytriton_dir / "tritonserver" / "bin" / "tritonserver").is_file():
        raise ServerError(
            "no tritonserver found: put one on PATH (NVIDIA's container has it) "
            "or install the bundled CPU build with `pip install nvidia-pytriton==0.7.0`"
        )
    libs = pytriton_dir.parent / "nvidia_pytriton.libs"
    venv_bin = Path(sys.executable).parent  # not resolved: a venv's python is a symlink to the base one
    return TritonInstall(
        executable=pytriton_dir / "tritonserver" / "bin" / "tritonserver",
        backend_directory=_prepare_python_backend(pytriton_dir),
        env={
            "LD_LIBRARY_PATH": _prepend_path(str(libs), os.environ.get("LD_LIBRARY_PATH")),
            "PATH": _prepend_path(str(venv_bin), os.environ.get("PATH")),
        },
    )


def free_ports(count: int, host: str = "127.0.0.1") -> tuple[int, ...]:
    """``count`` distinct ports that are free now (all held open together so none repeats)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return tuple(s.getsockname()[1] for s in sockets)
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class ServerConfig:
    repository: Path
    host: str = "127.0.0.1"  # 0.0.0.0 to accept connections from other machines
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002  # Prometheus metrics at http://host:metrics_port/metrics
    log_verbose: int = 0
    # none: load everything at start; explicit: also load everything, then allow load/unload requests;
    # poll: reload models whose files change.
    model_control: Literal["none", "explicit", "poll"] = "none"
    log_file: Path | None = None  # the server's stdout and stderr; None = a new temporary file
    # The value of the ADMIN_HEADER that unlocks ADMIN_PROTOCOLS; None = a new random key for each start.
    admin_key: str | None = None
    tls_cert: Path | None = None  # PEM certificate and key: gRPC over TLS (HTTP stays plaintext: bind it locally)
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and its private key")

    @property
    def client_host(self) -> str:
        """Where a client on this machine connects when the server listens on every interface."""
        return {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(self.host, self.host)


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A pre-exec hook so that the server gets SIGTERM when we die: a killed test run leaves no server.

    libc is loaded here, before the fork, because the child may only make the plain call.
    """
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None).prctl
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


SHM_REGION_PREFIX = "triton_python_backend_shm_region"  # a stub argument; the file is /dev/shm/<name>


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group (Linux /proc): a server and its Python stubs."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def reap_group(pgid: int, timeout_s: float = 10.0) -> list[str]:
    """Kill what is left of a dead server's process group and unlink its Python-backend shared memory.

    A tritonserver killed with SIGKILL leaves its Python stubs running (parent PID 1) with their /dev/shm
    regions; the stubs stay in the server's process group, and each one's command line names its region.
    Returns the regions removed.
    """
    members = group_members(pgid)
    regions: set[str] = set()
    for pid in members:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        regions.update(a.decode() for a in args if a.startswith(SHM_REGION_PREFIX.encode()))
    if members:
        with contextlib.suppress(ProcessLookupError):  # the last one exited meanwhile
            os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
    removed = []
    for region in sorted(regions):
        path = Path("/dev/shm") / region
        if path.exists():
            path.unlink(missing_ok=True)
            removed.append(region)
    return removed


def metric_value(text: str, series: str) -> float:
    """The value of ``series`` (name and labels) in a Prometheus text page; nan if absent."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


class TritonServer:
    """One tritonserver process; as a context manager it is started, ready, and stopped on exit."""

    def __init__(self, config: ServerConfig, install: TritonInstall | None = None) -> None:
        self.config = config
        self.install = install or find_tritonserver()
        if config.log_file is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        else:
            self.log_path = config.log_file
        self._process: subprocess.Popen[bytes] | None = None
        self.admin_key = config.admin_key or secrets.token_urlsafe(24)

    @property
    def admin_headers(self) -> dict[str, str]:
        """What a gRPC caller sends to use the admin protocols (model load/unload, logging, shared memory)."""
        return {GRPC_ADMIN_HEADER: self.admin_key}

    def client(self) -> grpcclient.InferenceServerClient:
        """A gRPC client of this server, over TLS when it serves TLS (trusting its certificate)."""
        if self.config.tls_cert is None:
            return grpcclient.InferenceServerClient(self.url)
        return grpcclient.InferenceServerClient(self.url, ssl=True, root_certificates=str(self.config.tls_cert))

    @property
    def url(self) -> str:
        """The gRPC address for ``tritonclient.grpc.InferenceServerClient``."""
        return f"{self.config.client_host}:{self.config.grpc_port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def command(self) -> list[str]:
        c = self.config
        args = [
            str(self.install.executable),
            f"--model-repository={c.repository.resolve()}",
            f"--grpc-address={c.host}",
            f"--grpc-port={c.grpc_port}",
            f"--http-address={c.host}",
            f"--http-port={c.http_port}",
            f"--metrics-address={c.host}",
            f"--metrics-port={c.metrics_port}",
            "--strict-readiness=true",  # ready only once every model is
            "--exit-on-error=true",  # a model that fails to load stops the server, loudly
            f"--log-verbose={c.log_verbose}",
            f"--model-control-mode={c.model_control}",
        ]
        restricted = f"{','.join(ADMIN_PROTOCOLS)}:{ADMIN_HEADER}={self.admin_key}"
        args += [f"--grpc-restricted-protocol={restricted}", f"--http-restricted-api={restricted}"]
        if c.tls_cert is not None and c.tls_key is not None:
            args += ["--grpc-use-ssl=true", f"--grpc-server-cert={c.tls_cert.resolve()}",
                     f"--grpc-server-key={c.tls_key.resolve()}"]
        if c.model_control == "explicit":
            args.append("--load-model=*")
        if self.install.backend_directory is not None:
            args.append(f"--backend-directory={self.install.backend_directory}")
        return args

    def start(self) -> None:
        if self._process is not None:
            raise ServerError("this server was already started")
        if not self.config.repository.is_dir():
            raise ServerError(f"model repository {self.config.repository} is not a directory")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.install.env},
                # Own process group: a terminal's Ctrl-C reaches us once, and we forward it once.
                start_new_session=True,
                preexec_fn=_die_with_parent_hook(),
            )

    def metric(self, series: str, until: Callable[[float], bool] | None = None, timeout_s: float = 10.0) -> float:
        """One series' value on the metrics port (``series``: the name and labels as printed, e.g.
        ``genrec_user_cache_users{model="recommender"}``), nan if it is not there. genrec's own series are
        written just after each batch's responses (`triton_model.Writer`): ``until`` waits, up to
        ``timeout_s``, for the value a caller expects, and the value read last is returned either way."""
        url = f"http://{self.config.client_host}:{self.config.metrics_port}/metrics"
        deadline = time.monotonic() + timeout_s
        while True:
            with urllib.request.urlopen(url, timeout=10) as response:
                value = metric_value(response.read().decode(), series)
            if until is None or until(value) or time.monotonic() > deadline:
                return value
            time.sleep(0.01)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _error(self, message: str) -> ServerError:
        """The message with the log's error lines (Triton prints the cause long before the end)."""
        log = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        errors = [line for line in log.splitlines() if re.match(r"E\d{4} ", line)]
        return ServerError(
            f"{message}\n--- errors in {self.log_path} ---\n"
            + "\n".join(errors[-LOG_TAIL_LINES:])
            + f"\n--- last lines ---\n{self.log_tail()}"
        )

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until the server and every model in the repository are ready."""
        if self._process is None:
            raise ServerError("start() the server before waiting for it")
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while True:
                returncode = self._process.poll()
                if returncode is not None:
                    raise self._error(f"tritonserver exited with code {returncode} before it was ready")
                try:
                    if client.is_server_ready(client_timeout=2.0):
                        break
                except InferenceServerException:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise self._error(f"tritonserver was not ready after {timeout_s:.0f} s")
                time.sleep(0.1)
            index = client.get_model_repository_index(headers=self.admin_headers)
            names = sorted({m.name for m in index.models})
            not_ready = [name for name in names if not client.is_model_ready(name)]
        if not_ready:
            raise self._error(f"models not ready: {', '.join(not_ready)}")

    def send_signal(self, signum: int) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signum)

    def wait(self) -> int:
        """Block until the process exits; return its exit code. Its stubs and their memory go with it."""
        if self._process is None:
            raise ServerError("the server was never started")
        returncode = self._process.wait()
        reap_group(self._process.pid)
        return returncode

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL to the whole group after ``timeout_s``; always reaps the server, its
        stubs and their shared memory, however it ended. Exit code or None."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        reap_group(self._process.pid)
        return self._process.returncode

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def serve(config: ServerConfig, ready_callback: Callable[[TritonServer], None] | None = None) -> int:
    """Run tritonserver in the foreground until it exits or we get SIGINT/SIGTERM; its exit code."""
    server = TritonServer(config)
    server.start()
    forwarded = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, _frame: server.send_signal(signum)) for s in forwarded}
    try:
        server.wait_ready()
        host = config.client_host
        print(
            f"tritonserver ready (pid {server.pid}): grpc {host}:{config.grpc_port}, "
            f"http {host}:{config.http_port}, metrics http://{host}:{config.metrics_port}/metrics\n"
            f"  listening on {config.host}; log: {server.log_path}; Ctrl-C to stop",
            flush=True,
        )
        if ready_callback is not None:
            ready_callback(server)
        return server.wait()
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _library_links(libs: Path) -> Path:
    """A folder of plain-named symlinks to the wheel's hash-named libraries that perf_analyzer needs."""
    links = cache_dir() / "perf-analyzer-libs"
    links.mkdir(parents=True, exist_ok=True)
    for plain, pattern in (("libb64.so.0d", "libb64-*.so.0d"), ("libcudart.so.12", "libcudart-*.so.12*")):
        matches = sorted(libs.glob(pattern))
        if not matches:
            raise ServerError(f"{libs} has no {pattern} for perf_analyzer")
        staging = links / f".{plain}.{os.getpid()}"
        staging.unlink(missing_ok=True)
        staging.symlink_to(matches[-1])
        staging.replace(links / plain)  # atomic: concurrent callers never see a half-made link
    return links


def find_perf_analyzer() -> tuple[Path, dict[str, str]]:
    """The perf_analyzer from the tritonclient wheel and the environment to run it in."""
    candidate = Path(sysconfig.get_path("scripts")) / "perf_analyzer"
    on_path = shutil.which("perf_analyzer")
    if candidate.is_file():
        executable = candidate
    elif on_path is not None:
        executable = Path(on_path)
    else:
        raise ServerError("perf_analyzer not found: `pip install tritonclient[all]==2.51.0` ships it")
    env = dict(os.environ)
    pytriton_dir = _pytriton_dir()
    if pytriton_dir is not None and (pytriton_dir.parent / "nvidia_pytriton.libs").is_dir():
        links = _library_links(pytriton_dir.parent / "nvidia_pytriton.libs")
        env["LD_LIBRARY_PATH"] = _prepend_path(str(links), env.get("LD_LIBRARY_PATH"))
    return executable, env
