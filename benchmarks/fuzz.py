"""Seeded malformed requests to every served model: what a hostile caller would send.

`valid_requests` asks a running server for one valid request per model (the composing models' inputs come
from the encoder's real output); `fuzz` mutates them one or two ways at a time (an input dropped, another
dtype, another batch or inner shape, extreme or non-finite values, lengths that disagree, inputs many times
too long) and counts the answers by gRPC status. Used by the server tests and `benchmarks/reliability.py`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from genrec.builders import handlers as h
from genrec.client import protocol

Request = dict[str, np.ndarray]  # tensor name -> array with its batch dimension
MODELS = (protocol.RECOMMEND, protocol.RANK, protocol.RETRIEVE, "recommender", "user_encoder", "item_retrieval",
          "candidate_scorer", "top_n")
EXTREME_FLOATS = (np.nan, np.inf, -np.inf, 3e38, -0.0)


@dataclass
class FuzzResult:
    statuses: Counter[str] = field(default_factory=Counter)  # gRPC status name (OK for an answer) -> count
    internal: list[str] = field(default_factory=list)  # each answer neither OK nor INVALID_ARGUMENT
    mutations: Counter[str] = field(default_factory=Counter)

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())


def _infer(client: grpcclient.InferenceServerClient, model: str, request: Request, timeout_s: float):  # type: ignore[no-untyped-def]
    inputs = []
    for name, array in request.items():
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        inputs.append(tensor.set_data_from_numpy(array))
    return client.infer(model, inputs, client_timeout=timeout_s)


def valid_requests(url: str, history: list[int], candidates: list[int]) -> dict[str, Request]:
    """One valid request per served model, for this history (raw ids the model knows)."""
    n = len(history)
    base: Request = {
        protocol.HISTORY_ITEM_IDS: np.array([history], np.int64),
        protocol.HISTORY_TIMESTAMPS: np.array([1_000_000_000 + 3600 * np.arange(n)], np.int64),
        protocol.HISTORY_ACTIONS: np.zeros((1, n), np.int64),
    }
    top = {protocol.K: np.array([[5]], np.int32), protocol.EXCLUDE_SEEN: np.array([[True]])}
    user = {protocol.USER_ID: np.array([[b"fuzz-user"]], dtype=np.object_)}
    ids = np.array([candidates], np.int64)
    with grpcclient.InferenceServerClient(url) as client:
        encoded = _infer(client, "user_encoder", base, 30.0)
        cache = {name: encoded.as_numpy(name) for name in (h.USER_EMBEDDING, h.KV_KEYS, h.KV_VALUES, h.KV_TIMESTAMPS)}
    return {
        protocol.RECOMMEND: {**base, **top, **user},
        protocol.RETRIEVE: {**base, **top},
        protocol.RANK: {**base, protocol.CANDIDATE_ITEM_IDS: ids, **user},
        "recommender": {**base, **top, **user},
        "user_encoder": base,
        "item_retrieval": {h.USER_EMBEDDING: cache[h.USER_EMBEDDING], protocol.HISTORY_ITEM_IDS: base[protocol.HISTORY_ITEM_IDS],
                           protocol.EXCLUDE_SEEN: top[protocol.EXCLUDE_SEEN]},
        "candidate_scorer": {**cache, protocol.CANDIDATE_ITEM_IDS: ids},
        "top_n": {h.RETRIEVED_ITEM_IDS: ids, h.CANDIDATE_SCORES: np.linspace(1, 0, ids.shape[1], dtype=np.float32)[None],
                  protocol.K: top[protocol.K]},
    }


def _values(array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = array.copy()
    if out.size == 0:
        return out
    flat = out.reshape(-1)
    at = rng.integers(0, flat.size, size=max(1, flat.size // 4))
    if out.dtype.kind == "f":
        pool = np.array(EXTREME_FLOATS, out.dtype)
    elif out.dtype.kind in "iu":
        info = np.iinfo(out.dtype)  # the type's extremes, -1, 0, an id far beyond any catalogue
        pool = np.array([info.min, info.max, max(info.min, -1), 0, min(info.max, 10**12)], out.dtype)
    elif out.dtype.kind == "O":  # BYTES (user ids): empty, too long, not UTF-8
        pool = np.array([b"", b"x" * 10_000, b"\xff\xfe", b"\x00"], dtype=np.object_)
    else:
        pool = np.array([False, True])
    flat[at] = pool[rng.integers(0, len(pool), size=len(at))]
    return out


def _dtype(array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    choices = [np.float32, np.int32, np.int64, np.float64, np.bool_]
    if array.dtype.kind == "O":  # BYTES sent as numbers
        return np.zeros(array.shape, choices[int(rng.integers(len(choices)))])
    other = [d for d in choices if np.dtype(d) != array.dtype]
    with np.errstate(invalid="ignore"):  # NaN or inf cast to an integer: whatever it becomes is sent
        return array.astype(other[int(rng.integers(len(other)))])


MUTATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "values": _values,
    "dtype": _dtype,
    "two users": lambda a, rng: np.concatenate([a, a]),
    "no user": lambda a, rng: a[:0],
    "empty": lambda a, rng: a[:, :0] if a.ndim > 1 else a,
    "extra dim": lambda a, rng: a[:, None],
    "shorter": lambda a, rng: a[:, : max(1, a.shape[1] // 2)] if a.ndim > 1 else a,
    "100x longer": lambda a, rng: np.concatenate([a] * 100, axis=1) if a.ndim > 1 else a,
    "transposed": lambda a, rng: np.swapaxes(a, 1, -1).copy() if a.ndim > 2 else a.T.copy(),
}


def mutate(request: Request, rng: np.random.Generator) -> tuple[Request, str]:
    """The request with one or two of its inputs changed (or dropped); what was done, as a label."""
    out = dict(request)
    labels = []
    for _ in range(int(rng.integers(1, 3))):
        name = sorted(out)[int(rng.integers(len(out)))] if out else None
        if name is None:
            break
        kind = "drop" if rng.random() < 0.1 else sorted(MUTATIONS)[int(rng.integers(len(MUTATIONS)))]
        if kind == "drop":
            del out[name]
        else:
            out[name] = np.ascontiguousarray(MUTATIONS[kind](out[name], rng))
        labels.append(f"{kind}:{name}")
    return out, "+".join(labels)


def fuzz(url: str, valid: dict[str, Request], count: int, seed: int = 0, timeout_s: float = 30.0) -> FuzzResult:
    """``count`` malformed requests, round-robin over the models; every answer counted by status."""
    rng = np.random.default_rng(seed)
    result = FuzzResult()
    models = sorted(valid)
    with grpcclient.InferenceServerClient(url) as client:
        for i in range(count):
            model = models[i % len(models)]
            request, label = mutate(valid[model], rng)
            result.mutations[label.split(":")[0]] += 1
            try:
                _infer(client, model, request, timeout_s)
                status = "OK"
            except InferenceServerException as error:
                status = str(error.status()).removeprefix("StatusCode.")
                if status != "INVALID_ARGUMENT":  # INTERNAL is a bug; UNAVAILABLE or a deadline, a crash or a hang
                    result.internal.append(f"{model} [{label}] {status}: {error.message()}")
            result.statuses[status] += 1
    return result
