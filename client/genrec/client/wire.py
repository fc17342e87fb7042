"""Requests and responses of the served ensembles, shared by the sync and the asyncio client.

A `Call` is everything one Triton request needs: the ensemble, its `InferInput`s (batch dim 1,
shapes ``[1, L]``), the outputs to ask for, and how to parse the `InferResult`. The clients only
send calls, retry the transient failures (`is_transient`, `backoff_s`) and map errors (`error`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
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

# Worth another try: the server was unreachable. Never retried: bad input, unknown model, ..., and a
# deadline: the server may still be computing it, and retrying slow requests is how overload becomes a storm.
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


def infer_inputs(endpoint: protocol.Endpoint, arrays: dict[str, np.ndarray]) -> list[InferInput]:
    """One `InferInput` per protocol input, in the protocol's order: (n,) -> [1, n]."""
    if set(arrays) != {t.name for t in endpoint.inputs}:
        raise ValueError(f"{endpoint.model} takes {[t.name for t in endpoint.inputs]}, got {sorted(arrays)}")
    inputs = []
    for tensor in endpoint.inputs:
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


def top_k_call(model: str, history: History, k: int, exclude_seen: bool) -> Call[Recommendations]:
    """A `recommend` or `retrieve` request; `k` and `exclude_seen` are validated already."""
    endpoint = protocol.ENDPOINTS[model]
    arrays = _history_arrays(history)
    arrays[protocol.K] = np.array([k], dtype=np.int32)
    arrays[protocol.EXCLUDE_SEEN] = np.array([exclude_seen], dtype=np.bool_)
    return Call(model, infer_inputs(endpoint, arrays), _requested(endpoint), lambda r: parse_top_k(r, model))


def rank_call(history: History, candidate_ids: np.ndarray) -> Call[Ranking]:
    """A `rank` request; candidate_ids: int64 (C,), validated already."""
    endpoint = protocol.ENDPOINTS[protocol.RANK]
    arrays = _history_arrays(history)
    arrays[protocol.CANDIDATE_ITEM_IDS] = candidate_ids
    return Call(
        protocol.RANK,
        infer_inputs(endpoint, arrays),
        _requested(endpoint),
        lambda r: parse_rank(r, candidate_ids),
    )


def top_k(
    model: str, user_seq: Any, k: Any, timestamps: Any | None, actions: Any | None, exclude_seen: Any
) -> Call[Recommendations]:
    """Validate one user's `recommend`/`retrieve` input and build its call."""
    history = validate.history(user_seq, timestamps, actions, now=int(time.time()))
    return top_k_call(model, history, validate.k(k), validate.flag(exclude_seen, "exclude_seen"))


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


def rank(user_seq: Any, candidates: Any, timestamps: Any | None, actions: Any | None) -> Call[Ranking]:
    """Validate one user's `rank` input and build its call."""
    history = validate.history(user_seq, timestamps, actions, now=int(time.time()))
    return rank_call(history, validate.item_ids(candidates, "candidates"))


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
        num_unknown=_count(result, _tensor(endpoint, protocol.NUM_UNKNOWN), model),
        num_truncated=_count(result, _tensor(endpoint, protocol.NUM_TRUNCATED), model),
    )


def parse_rank(result: InferResult, candidate_ids: np.ndarray) -> Ranking:
    model = protocol.RANK
    endpoint = protocol.ENDPOINTS[model]
    scores = _output(result, _tensor(endpoint, protocol.SCORES), model)
    if scores.shape != candidate_ids.shape:
        raise GenrecError(f"{model}: {scores.size} scores for {candidate_ids.size} candidates", model=model)
    return Ranking(
        candidate_ids=candidate_ids.copy(),
        scores=scores.copy(),
        num_unknown=_count(result, _tensor(endpoint, protocol.NUM_UNKNOWN), model),
        num_truncated=_count(result, _tensor(endpoint, protocol.NUM_TRUNCATED), model),
    )


def error(exc: InferenceServerException, model: str | None, url: str) -> GenrecError:
    """tritonclient's exception -> GenrecError with the server's message and bare status name."""
    status = exc.status()
    status = None if status is None else str(status).removeprefix("StatusCode.")
    where = f"{model} at {url}" if model else url
    message = caller_names(str(exc.message()), ARGUMENT_NAMES)
    return GenrecError(f"{where}: [{status}] {message}", status=status, model=model)


def connect(client_class: type[T], url: Any, **tls: Any) -> T:
    """A tritonclient (``tritonclient.grpc`` or its ``aio``) for ``url`` with `CHANNEL_ARGS`; tls: ``ssl``,
    ``root_certificates``, ``private_key``, ``certificate_chain`` as tritonclient takes them."""
    if not isinstance(url, str) or not url.strip():
        raise GenrecError(f"url must be 'host:port', got {url!r}", status="INVALID_ARGUMENT")
    try:
        return client_class(url, channel_args=list(CHANNEL_ARGS), **tls)  # type: ignore[call-arg]
    except (InferenceServerException, OSError, ValueError, TypeError) as exc:
        raise GenrecError(f"cannot create a gRPC client for {url}: {exc}") from None


def is_transient(err: GenrecError) -> bool:
    return err.status in TRANSIENT


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
