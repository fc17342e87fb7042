"""Fused CPU kernels, compiled on first use for the machine that runs them.

`hstu.attend_cached` spends most of candidate scoring and of a prefill in elementwise passes over the (C or L,
H, L) scores that ``baddbmm`` writes and ``bmm`` reads back (``benchmarks/results/kv_cache.md``). ``attend_cached.cpp`` fuses the
whole chain so that the scores never leave L1; it is compiled with the system C++ compiler (``$CXX``, else
``g++``) and ``-march=native`` into a shared library, cached by a hash of the source, the flags, the compiler and
the head sizes. Where no compiler works, or for anything the kernel does not cover (autograd, tracing or export,
another device or dtype), callers keep the eager form: same results, slower. The
kernel links OpenMP, and inside a process that has imported torch it shares torch's own OpenMP runtime.

Environment: ``GENREC_NATIVE=0`` turns the kernels off; ``GENREC_KERNEL_CACHE`` is where libraries go
(default ``~/.cache/genrec/kernels``, else a folder under the temporary directory when home is read-only).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("attend_cached.cpp")
# Not -ffast-math: linked into a shared library it would set flush-to-zero for the whole process.
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared")
COMPILE_TIMEOUT_S = 300

_I64 = ctypes.c_int64
_ARGTYPES: list[type] = [*[ctypes.c_void_p] * 5, *[_I64] * 14, ctypes.c_float, ctypes.c_int]
_lock = threading.Lock()
_kernels: dict[tuple[int, int], Callable | None] = {}
_failures: dict[tuple[int, int], str] = {}

AttendKernel = Callable[[Tensor, Tensor, Tensor, Tensor, float, bool], Tensor]


def enabled() -> bool:
    return os.environ.get("GENREC_NATIVE", "1") != "0"


def cache_dir() -> Path:
    configured = os.environ.get("GENREC_KERNEL_CACHE")
    candidates = [Path(configured)] if configured else [Path.home() / ".cache" / "genrec" / "kernels"]
    candidates.append(Path(tempfile.gettempdir()) / f"genrec-kernels-{os.getuid()}")
    for path in candidates:
        try:
            path.mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
        except OSError:
            continue
    raise OSError(f"no writable folder for compiled kernels among {[str(p) for p in candidates]}")


def _compiler() -> str:
    compiler = os.environ.get("CXX", "g++")
    found = shutil.which(compiler)
    if found is None:
        raise FileNotFoundError(f"no C++ compiler {compiler!r} on PATH (set CXX)")
    return found


def _build(dq: int, dv: int) -> Path:
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    defines = (f"-DDQ={dq}", f"-DDV={dv}")
    digest = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, *defines, version]).encode()).hexdigest()[:16]
    library = cache_dir() / f"attend_cached_{dq}x{dv}_{digest}.so"
    if not library.exists():
        # Several model instances may compile at once: each writes its own file, then renames it into place.
        scratch = library.with_name(f"{library.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
        command = [compiler, *FLAGS, *defines, str(SOURCE), "-o", str(scratch)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if result.returncode != 0:
            scratch.unlink(missing_ok=True)
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[-2000:]}")
        os.replace(scratch, library)
    return library


def _load(dq: int, dv: int) -> AttendKernel:
    function = ctypes.CDLL(str(_build(dq, dv))).attend_cached
    function.argtypes = _ARGTYPES  # type: ignore[assignment]
    function.restype = None

    def attend(q: Tensor, keys: Tensor, values: Tensor, bias: Tensor, scale: float, causal: bool) -> Tensor:
        b, t, h, _ = q.shape
        q, keys, values = (_heads_packed(x) for x in (q, keys, values))
        per_query = bias.shape[1] != 1
        if per_query and bias.stride(1) != 1:  # the kernel reads 16 queries' bias for a key as one vector
            bias = bias.transpose(1, 2).contiguous().transpose(1, 2)
        out = torch.empty((b, t, h, dv), dtype=q.dtype)
        function(q.data_ptr(), keys.data_ptr(), values.data_ptr(), bias.data_ptr(), out.data_ptr(),
                 b, t, h, keys.shape[1], q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
                 values.stride(0), values.stride(1), bias.stride(0), int(per_query), bias.stride(2), int(causal),
                 scale, torch.get_num_threads())
        return out

    return attend


def _heads_packed(x: Tensor) -> Tensor:
    """(B, N, H, d) with each row's heads packed (strides d and 1), as the kernel reads them."""
    return x if x.stride(3) == 1 and x.stride(2) == x.shape[3] else x.contiguous()


def attend_kernel(q: Tensor, keys: Tensor, values: Tensor, bias: Tensor) -> AttendKernel | None:
    """The fused kernel for these arguments of `hstu.attend_cached`, or None where the eager form must run."""
    if not enabled():
        return None
    tensors = (q, keys, values, bias)
    if any(x.device.type != "cpu" or x.dtype != torch.float32 for x in tensors):
        return None
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return None
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return None
    return kernel(q.shape[3], values.shape[3])


def kernel(dq: int, dv: int) -> AttendKernel | None:
    """The compiled kernel for these head sizes, built once per process; None (and a warning) where it fails."""
    key = (dq, dv)
    if key not in _kernels:
        with _lock:
            if key not in _kernels:
                try:
                    _kernels[key] = _load(dq, dv)
                except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                    _failures[key] = str(error)
                    _kernels[key] = None
                    log.warning("fused attention kernel unavailable, using the eager form: %s", error)
    return _kernels[key]


def failure(dq: int, dv: int) -> str | None:
    """Why the kernel for these head sizes could not be built, if it could not."""
    return _failures.get((dq, dv))
