"""Fused CPU kernels, compiled on first use for the machine that runs them.

`hstu.attend_cached` spends most of candidate scoring and of a prefill in elementwise passes over the (C or L,
H, L) scores that ``baddbmm`` writes and ``bmm`` reads back (``benchmarks/results/kv_cache.md``).
``attend_cached.cpp`` fuses the whole chain so that the scores never leave L1, and for new tokens (candidates,
appended events) also everything else a layer does between its two matmuls (one call instead of ~20 small ops).
It is compiled with the system C++ compiler (``$CXX``, else ``g++``) and ``-march=native`` into a shared library,
cached by a hash of the source, the flags, the compiler and the head sizes. Where no compiler works, or for
anything the kernels do not cover (autograd, tracing or export, another device or dtype), callers keep the eager
form: same results, slower. The library links OpenMP, and inside a process that has imported torch it shares
torch's own OpenMP runtime.

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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("attend_cached.cpp")
# Not -ffast-math: linked into a shared library it would set flush-to-zero for the whole process.
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared")
COMPILE_TIMEOUT_S = 300

_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_ATTEND_ARGS: list[type] = [*[_PTR] * 5, *[_I64] * 14, _F32, ctypes.c_int]
_LAYER_ARGS: list[type] = [*[_PTR] * 5, _I64, _PTR, _PTR, _I64, _F32, _PTR, _I64, _PTR, _PTR, _F32, *[_PTR] * 5,
                           *[_I64] * 9, _F32, ctypes.c_int]

AttendKernel = Callable[[Tensor, Tensor, Tensor, Tensor, float, bool], Tensor]
LayerKernel = Callable[..., tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Kernels:
    """The compiled entry points for one pair of head sizes: `hstu.attend_cached`, and the whole of
    `hstu.HSTULayer.step_fused` between its two matmuls: (pre, pre_bias, keys, values, width, buckets, limits,
    masked, write_pos, self_index, table, norm_weight, norm_bias, eps, x, out_bias, scale) -> (y, residual), as
    ``layer_step`` in attend_cached.cpp. ``pre``, the input projection without its bias, is overwritten."""

    attend: AttendKernel
    layer_step: LayerKernel


_lock = threading.Lock()
_kernels: dict[tuple[int, int], Kernels | None] = {}
_failures: dict[tuple[int, int], str] = {}


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


def _load(dq: int, dv: int) -> Kernels:
    library = ctypes.CDLL(str(_build(dq, dv)))
    attend_function, layer_function = library.attend_cached, library.layer_step
    attend_function.argtypes = _ATTEND_ARGS  # type: ignore[assignment]
    layer_function.argtypes = _LAYER_ARGS  # type: ignore[assignment]
    attend_function.restype = layer_function.restype = None

    def attend(q: Tensor, keys: Tensor, values: Tensor, bias: Tensor, scale: float, causal: bool) -> Tensor:
        b, t, h, _ = q.shape
        q, keys, values = (_heads_packed(x) for x in (q, keys, values))
        per_query = bias.shape[1] != 1
        if per_query and bias.stride(1) != 1:  # the kernel reads 16 queries' bias for a key as one vector
            bias = bias.transpose(1, 2).contiguous().transpose(1, 2)
        out = torch.empty((b, t, h, dv), dtype=q.dtype)
        attend_function(q.data_ptr(), keys.data_ptr(), values.data_ptr(), bias.data_ptr(), out.data_ptr(),
                        b, t, h, keys.shape[1], q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
                        values.stride(0), values.stride(1), bias.stride(0), int(per_query), bias.stride(2),
                        int(causal), scale, torch.get_num_threads())
        return out

    def layer_step(pre: Tensor, pre_bias: Tensor, keys: Tensor, values: Tensor, width: int, buckets: Tensor,
                   limits: Tensor, masked: float, write_pos: Tensor | None, self_index: int | None, table: Tensor,
                   norm_weight: Tensor, norm_bias: Tensor, eps: float, x: Tensor, out_bias: Tensor,
                   scale: float) -> tuple[Tensor, Tensor]:
        b, t, d = x.shape
        h = keys.shape[2]
        per_query = buckets.shape[1] != 1
        pre, pre_bias, x, buckets, limits, table, norm_weight, norm_bias, out_bias = (
            a.contiguous() for a in (pre, pre_bias, x, buckets, limits, table, norm_weight, norm_bias, out_bias))
        if write_pos is not None:
            write_pos = write_pos.contiguous()
            assert keys.stride(3) == values.stride(3) == 1 and keys.stride(2) == keys.shape[3]  # written in place
        else:
            keys, values = _heads_packed(keys), _heads_packed(values)
        y, residual = torch.empty((b, t, h * dv), dtype=x.dtype), torch.empty_like(x)
        rows = torch.empty((b, buckets.shape[1], width), dtype=x.dtype)
        layer_function(pre.data_ptr(), pre_bias.data_ptr(), keys.data_ptr(), values.data_ptr(),
                       None if write_pos is None else write_pos.data_ptr(), int(self_index is not None),
                       buckets.data_ptr(), limits.data_ptr(), int(per_query), masked, table.data_ptr(), self_index or 0,
                       norm_weight.data_ptr(), norm_bias.data_ptr(), eps, x.data_ptr(), out_bias.data_ptr(),
                       y.data_ptr(), residual.data_ptr(), rows.data_ptr(), b, t, h, width, d, keys.stride(0),
                       keys.stride(1), values.stride(0), values.stride(1), scale, torch.get_num_threads())
        return y, residual

    return Kernels(attend, layer_step)


def _heads_packed(x: Tensor) -> Tensor:
    """(B, N, H, d) with each row's heads packed (strides d and 1), as the kernel reads them."""
    return x if x.stride(3) == 1 and x.stride(2) == x.shape[3] else x.contiguous()


def _usable(tensors: tuple[Tensor, ...]) -> bool:
    """Whether a kernel may run on these tensors: float32 on the CPU, no autograd, no tracing or export."""
    if not enabled():
        return False
    if any(x.device.type != "cpu" or x.dtype != torch.float32 for x in tensors):
        return False
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return False
    return not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


def attend_kernel(q: Tensor, keys: Tensor, values: Tensor, bias: Tensor) -> AttendKernel | None:
    """The fused kernel for these arguments of `hstu.attend_cached`, or None where the eager form must run."""
    kernels = kernel(q.shape[3], values.shape[3]) if _usable((q, keys, values, bias)) else None
    return kernels.attend if kernels is not None else None


def layer_kernel(x: Tensor, keys: Tensor, values: Tensor) -> LayerKernel | None:
    """`Kernels.layer_step` for new tokens x (B, T, D) against a cache's keys / values (B, layers, L, H, d), or
    None where the eager form must run."""
    kernels = kernel(keys.shape[-1], values.shape[-1]) if _usable((x, keys, values)) else None
    return kernels.layer_step if kernels is not None else None


def kernel(dq: int, dv: int) -> Kernels | None:
    """The compiled kernels for these head sizes, built once per process; None (and a warning) where it fails."""
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
