"""Requests and responses of the served ensembles, shared by the sync and the asyncio client.

A `Call` is everything one Triton request needs: the ensemble, its `InferInput`s (batch dim 1,
shapes ``[1, L]``), the outputs to ask for, and how to parse the `InferResult`. The clients only
send calls, retry the transient failures (`is_transient`, `backoff_s`) and map errors (`error`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from . import protocol, validate
from .errors import GenrecError
from .types import Ranking, Recommendations, ScoredItem
from .validate import History

R = TypeVar("R")
T = TypeVar("T")

# Worth another try: the server was unreachable. Never retried: bad input, unknown model, a failed TLS
# handshake (`is_tls_mismatch`), ..., and a deadline: the server may still be computing it, and retrying
# slow requests is how overload becomes a storm.
TRANSIENT = frozenset({"UNAVAILABLE"})
# gRPC's own reconnect backoff grows to 120 s, so a client of a restarted server stayed UNAVAILABLE for up to
# ~11 s after it was ready; reconnect attempts here are 0.1 s apart at first and never more than 1 s.
CHANNEL_ARGS = (
    ("grpc.max_send_message_length", 2**31 - 1),  # as tritonclient's defaults: the server's limits apply
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

# gRPC connects lazily: a TLS mismatch shows at the first call (or `ready()`), under this message.
TLS_MISMATCH = (
    "the TLS handshake failed: the server does not serve TLS, or the client does not trust its certificate"
)

# The served tensors under the names the caller gave them (RecommendClient's arguments).
ARGUMENT_NAMES = {
    protocol.HISTORY_ITEM_IDS: "user_seq",
    protocol.HISTORY_TIMESTAMPS: "timestamps",
    protocol.HISTORY_ACTIONS: "actions",
    protocol.CANDIDATE_ITEM_IDS: "candidates",
    protocol.K: "k",
}


@dataclass(frozen=True)
class Call(Generic[R]):
    model: str
    inputs: list[InferInput]
    outputs: list[InferRequestedOutput]
    parse: Callable[[InferResult], R]
    user_id: str | None = None  # routes the call to the user's replica


def infer_inputs(endpoint: protocol.Endpoint, arrays: dict[str, np.ndarray]) -> list[InferInput]:
    """One `InferInput` per protocol input given, in the protocol's order: (n,) -> [1, n]."""
    required = {t.name for t in endpoint.inputs if not t.optional}
    if not required <= set(arrays) <= {t.name for t in endpoint.inputs}:
        raise ValueError(f"{endpoint.model} takes {[t.name for t in endpoint.inputs]}, got {sorted(arrays)}")
    inputs = []
    for tensor in (t for t in endpoint.inputs if t.name in arrays):
        data = arrays[tensor.name].astype(triton_to_np_dtype(tensor.dtype), copy=False).reshape(1, -1)
        inputs.append(InferInput(tensor.name, list(data.shape), tensor.dtype).set_data_from_numpy(data))
    return inputs


def _history_arrays(history: History) -> dict[str, np.ndarray]:
    return {
        protocol.HISTORY_ITEM_IDS: history.item_ids,
        protocol.HISTORY_TIMESTAMPS: history.timestamps,
        protocol.HISTORY_ACTIONS: history.actions,
    }


def _requested(endpoint: protocol.Endpoint) -> list[InferRequestedOutput]:
    return [InferRequestedOutput(t.name) for t in endpoint.outputs]


def _with_user(arrays: dict[str, np.ndarray], user_id: str | None) -> dict[str, np.ndarray]:
    if user_id is not None:
        arrays[protocol.USER_ID] = np.array([user_id.encode()], dtype=np.object_)
    return arrays


def top_k_call(
    model: str, history: History, k: int, exclude_seen: bool, user_id: str | None = None
) -> Call[Recommendations]:
    """A `recommend` or `retrieve` request; `k`, `exclude_seen` and the user id are validated already."""
    endpoint = protocol.ENDPOINTS[model]
    arrays = _history_arrays(history)
    arrays[protocol.K] = np.array([k], dtype=np.int32)
    arrays[protocol.EXCLUDE_SEEN] = np.array([exclude_seen], dtype=np.bool_)
    return Call(model, infer_inputs(endpoint, _with_user(arrays, user_id)), _requested(endpoint),
                lambda r: parse_top_k(r, model), user_id)


def rank_call(history: History, candidate_ids: np.ndarray, user_id: str | None = None) -> Call[Ranking]:
    """A `rank` request; candidate_ids: int64 (C,), validated already."""
    endpoint = protocol.ENDPOINTS[protocol.RANK]
    arrays = _history_arrays(history)
    arrays[protocol.CANDIDATE_ITEM_IDS] = candidate_ids
    return Call(
        protocol.RANK,
        infer_inputs(endpoint, _with_user(arrays, user_id)),
        _requested(endpoint),
        lambda r: parse_rank(r, candidate_ids),
        user_id,
    )


def top_k(
    model: str, user_seq: Any, k: Any, timestamps: Any | None, actions: Any | None, exclude_seen: Any,
    user_id: Any = None,
) -> Call[Recommendations]:
    """Validate one user's `recommend`/`retrieve` input and build its call."""
    user = validate.user_id(user_id, timestamps)
    history = validate.history(user_seq, timestamps, actions, now=int(time.time()))
    return top_k_call(model, history, validate.k(k), validate.flag(exclude_seen, "exclude_seen"), user)


def top_k_batch(
    model: str,
    user_seqs: Any,
    k: Any,
    timestamps: Any | None,
    actions: Any | None,
    exclude_seen: Any,
) -> list[Call[Recommendations]]:
    """Validate every user's input (before anything is sent) and build one call per user."""
    n = validate.n_users(user_seqs)
    k_, exclude = validate.k(k), validate.flag(exclude_seen, "exclude_seen")
    now = int(time.time())
    per_user = zip(
        user_seqs,
        validate.per_user(timestamps, n, "timestamps"),
        validate.per_user(actions, n, "actions"),
        strict=True,
    )
    return [
        top_k_call(model, validate.history(seq, ts, act, now=now, fields=_fields(i)), k_, exclude)
        for i, (seq, ts, act) in enumerate(per_user)
    ]


def rank(
    user_seq: Any, candidates: Any, timestamps: Any | None, actions: Any | None, user_id: Any = None
) -> Call[Ranking]:
    """Validate one user's `rank` input and build its call."""
    user = validate.user_id(user_id, timestamps)
    history = validate.history(user_seq, timestamps, actions, now=int(time.time()))
    return rank_call(history, validate.item_ids(candidates, "candidates"), user)


def rank_batch(
    user_seqs: Any, candidates: Any, timestamps: Any | None, actions: Any | None
) -> list[Call[Ranking]]:
    n = validate.n_users(user_seqs)
    now = int(time.time())
    per_user = zip(
        user_seqs,
        validate.per_user(candidates, n, "candidates"),
        validate.per_user(timestamps, n, "timestamps"),
        validate.per_user(actions, n, "actions"),
        strict=True,
    )
    return [
        rank_call(
            validate.history(seq, ts, act, now=now, fields=_fields(i)),
            validate.item_ids(cand, f"candidates[{i}]"),
        )
        for i, (seq, cand, ts, act) in enumerate(per_user)
    ]


def _fields(i: int) -> tuple[str, str, str]:
    return f"user_seqs[{i}]", f"timestamps[{i}]", f"actions[{i}]"


def _output(result: InferResult, tensor: protocol.Tensor, model: str) -> np.ndarray:
    """The named output without its batch dimension: [1, n] -> (n,)."""
    array = result.as_numpy(tensor.name)
    if array is None:
        raise GenrecError(f"{model}: the response has no output {tensor.name!r}", model=model)
    if array.dtype != triton_to_np_dtype(tensor.dtype):
        raise GenrecError(
            f"{model}: output {tensor.name!r} is {array.dtype}, the protocol says {tensor.dtype}", model=model
        )
    return array.reshape(-1)


def _count(result: InferResult, tensor: protocol.Tensor, model: str) -> int:
    array = _output(result, tensor, model)
    if array.shape != (1,):
        raise GenrecError(f"{model}: output {tensor.name!r} has {array.size} values, expected 1", model=model)
    return int(array[0])


def _tensor(endpoint: protocol.Endpoint, name: str) -> protocol.Tensor:
    return next(t for t in endpoint.outputs if t.name == name)


def parse_top_k(result: InferResult, model: str) -> Recommendations:
    endpoint = protocol.ENDPOINTS[model]
    ids = _output(result, _tensor(endpoint, protocol.ITEM_IDS), model)
    scores = _output(result, _tensor(endpoint, protocol.SCORES), model)
    if ids.shape != scores.shape:
        raise GenrecError(f"{model}: {ids.size} item ids but {scores.size} scores", model=model)
    return Recommendations(
        items=tuple(ScoredItem(i, s) for i, s in zip(ids.tolist(), scores.tolist(), strict=True)),
        **_reports(result, endpoint),
    )


def _reports(result: InferResult, endpoint: protocol.Endpoint) -> dict[str, int]:
    """The endpoint's one-number outputs (num_unknown, num_truncated, cached_events where it has it)."""
    counts = (protocol.NUM_UNKNOWN, protocol.NUM_TRUNCATED, protocol.CACHED_EVENTS)
    return {t.name: _count(result, t, endpoint.model) for t in endpoint.outputs if t.name in counts}


def parse_rank(result: InferResult, candidate_ids: np.ndarray) -> Ranking:
    model = protocol.RANK
    endpoint = protocol.ENDPOINTS[model]
    scores = _output(result, _tensor(endpoint, protocol.SCORES), model)
    if scores.shape != candidate_ids.shape:
        raise GenrecError(f"{model}: {scores.size} scores for {candidate_ids.size} candidates", model=model)
    return Ranking(candidate_ids=candidate_ids.copy(), scores=scores.copy(), **_reports(result, endpoint))


def error(exc: InferenceServerException, model: str | None, url: str) -> GenrecError:
    """tritonclient's exception -> GenrecError with the server's message and bare status name."""
    status = exc.status()
    status = None if status is None else str(status).removeprefix("StatusCode.")
    where = f"{model} at {url}" if model else url
    message = caller_names(str(exc.message()), ARGUMENT_NAMES)
    if is_tls_mismatch(message):
        message = f"{TLS_MISMATCH} ({message})"
    return GenrecError(f"{where}: [{status}] {message}", status=status, model=model)


def is_tls_mismatch(message: str) -> bool:
    """gRPC connected but the TLS handshake failed: ``ssl=True`` against a plaintext server, or a certificate
    the client does not trust. Retrying cannot help, so such an UNAVAILABLE is not transient."""
    return "handshake failed" in message.lower()


def connect(client_class: type[T], url: Any, **tls: Any) -> T:
    """A tritonclient (``tritonclient.grpc`` or its ``aio``) for ``url`` with `CHANNEL_ARGS`; tls: ``ssl``,
    ``root_certificates``, ``private_key``, ``certificate_chain`` as tritonclient takes them."""
    if not isinstance(url, str) or not url.strip():
        raise GenrecError(f"url must be 'host:port', got {url!r}", status="INVALID_ARGUMENT")
    try:
        return client_class(url, channel_args=list(CHANNEL_ARGS), **tls)  # type: ignore[call-arg]
    except (InferenceServerException, OSError, ValueError, TypeError) as exc:
        raise GenrecError(f"cannot create a gRPC client for {url}: {exc}") from None


def connect_all(client_class: type[T], urls: tuple[str, ...], **tls: Any) -> list[T]:
    return [connect(client_class, url, **tls) for url in urls]


class Router:
    """Which replica serves a call, and which ones after it when it is down.

    A call with a user id goes to the replica that rendezvous hashing gives that user (the highest hash of
    replica url + user id), so every client sends a user to the same replica, where its K/V is cached; if
    that one is unavailable, to the user's next one. Other calls take the replicas in turn.
    """

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = tuple(urls)
        self._turn = itertools.count()

    def order(self, user_id: str | None) -> list[int]:
        n = len(self.urls)
        if user_id is None:
            first = next(self._turn) % n
            return [(first + i) % n for i in range(n)]
        return sorted(range(n), key=lambda i: _weight(self.urls[i], user_id), reverse=True)


def attempts(order: list[int], retries: int) -> Iterator[tuple[int, float]]:
    """(replica, seconds to wait first) of every attempt: the replicas in order, then ``retries`` more rounds,
    each after a jittered backoff."""
    for round_ in range(retries + 1):
        for i, replica in enumerate(order):
            yield replica, jittered_backoff_s(round_ - 1) if round_ and i == 0 else 0.0


class Attempts:
    """One call's retry rule, for both clients: iterate ``(replica, seconds to wait first)`` (`attempts`), and
    run each attempt inside ``failure(replica)``. That turns tritonclient's error into `GenrecError`, raises
    it at once unless it is transient, and otherwise lets the next attempt run; `exhausted` is the error to
    raise when none succeeded."""

    def __init__(self, call: Call[Any], order: list[int], retries: int, urls: Sequence[str]) -> None:
        self.call, self.urls, self._plan = call, urls, attempts(order, retries)
        self._last: GenrecError | None = None

    def __iter__(self) -> Iterator[tuple[int, float]]:
        return self._plan

    @contextlib.contextmanager
    def failure(self, replica: int) -> Iterator[None]:
        try:
            yield
        except InferenceServerException as exc:
            err = error(exc, self.call.model, self.urls[replica])
            if not is_transient(err):
                raise err from None
            self._last = err

    def exhausted(self) -> GenrecError:
        assert self._last is not None, "no attempt was made"
        return self._last


def _weight(url: str, user_id: str) -> bytes:
    return hashlib.blake2b(f"{url}\0{user_id}".encode(), digest_size=8).digest()


def is_transient(err: GenrecError) -> bool:
    return err.status in TRANSIENT and TLS_MISMATCH not in err.message


def backoff_s(attempt: int) -> float:
    """The most seconds to wait before retry number ``attempt + 1``: 0.1, 0.2, 0.4, ... capped at 2."""
    return float(min(0.1 * 2**attempt, 2.0))


def jittered_backoff_s(attempt: int) -> float:
    """`backoff_s` scaled by a random factor in [0.5, 1): clients that failed together do not retry together."""
    return backoff_s(attempt) * (0.5 + random.random() / 2)


def caller_names(message: str, names: dict[str, str]) -> str:
    """A server message with its tensor names (``'candidate_item_ids'``, ``history_timestamps[3]``) replaced
    by the caller's argument names (``candidates``, ``timestamps[3]``)."""
    for tensor, argument in names.items():
        message = message.replace(f"'{tensor}'", argument).replace(f"{tensor}[", f"{argument}[")
    return message


def in_batch(err: GenrecError, index: int) -> GenrecError:
    return GenrecError(f"user_seqs[{index}]: {err.message}", status=err.status, model=err.model)
