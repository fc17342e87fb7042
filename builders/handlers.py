"""What each served model does, as plain numpy-in / numpy-out code tested without Triton.

The Python backend's ``model.py`` is a thin adapter: it turns each request into a dict of numpy arrays,
calls ``Handler.execute`` once per batch of requests, and turns each result (or ``RequestError``) into a
response. One request is one user; every array has a leading batch dimension of 1.

    user_encoder      history (raw ids) -> user embedding + per-layer K/V of the history
    item_retrieval    user embedding -> the `retrieve_k` best items (history optionally excluded)
    candidate_scorer  K/V + user embedding + candidate ids -> one score per candidate
    top_n             candidates + scores + k -> the k best, ordered
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from genrec.builders.limits import Limits, RequestError
from genrec.builders.runtimes import Runtime, TorchRuntime
from genrec.client import protocol, validate
from genrec.training.batch import length_groups
from genrec.training.checkpoint import CheckpointMeta, load_meta
from genrec.training.retrieval import faiss_top_k, load_index, top_k
from genrec.training.sequences import Vocabulary, action_ids

# Tensors between composing models (inside the ensembles; the public ones are in genrec.client.protocol).
USER_EMBEDDING = "user_embedding"  # FP32 [D]
KV_KEYS = "kv_keys"  # FP32 [layers, L, H * d_qk]
KV_VALUES = "kv_values"  # FP32 [layers, L, H * d_v]
KV_TIMESTAMPS = "kv_timestamps"  # INT64 [L]
CANDIDATE_SCORES = "candidate_scores"  # FP32 [C]
RETRIEVED_ITEM_IDS = "retrieved_item_ids"  # INT64 [R]
RETRIEVED_SCORES = "retrieved_scores"  # FP32 [R]

Request = dict[str, np.ndarray]
Result = dict[str, np.ndarray] | Exception


class Handler(Protocol):
    def execute(self, requests: list[Request]) -> list[Result]: ...


def _input(request: Request, name: str) -> np.ndarray:
    """The request's tensor `name`; a RequestError naming it when the request has none."""
    if name not in request:
        raise RequestError(f"missing input '{name}'")
    return np.asarray(request[name])


def _row(request: Request, name: str, dtype: type) -> np.ndarray:
    """The request's tensor `name` as a 1-D array (its batch dimension must be 1)."""
    array = _input(request, name)
    if array.ndim != 2 or array.shape[0] != 1:
        raise RequestError(f"'{name}' must have shape [1, n] (one user per request), got {list(array.shape)}")
    return array[0].astype(dtype, copy=False)


def _scalar(request: Request, name: str) -> int:
    values = _row(request, name, np.int64)
    if values.shape != (1,):
        raise RequestError(f"'{name}' must hold exactly one value, got {values.shape[0]}")
    return int(values[0])


def _require_finite(values: np.ndarray, name: str) -> None:
    if not np.isfinite(values).all():
        raise RequestError(f"'{name}' holds NaN or infinite values")


def _examples(values: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")


@dataclass(frozen=True)
class Catalogue:
    """Raw <-> dense ids and the rating -> action mapping of one checkpoint."""

    vocab: Vocabulary
    action_values: np.ndarray  # (A,) rating value of action id a + 1

    @staticmethod
    def from_meta(meta: CheckpointMeta) -> Catalogue:
        if not np.issubdtype(meta.item_raw_ids.dtype, np.integer):
            raise ValueError("the served API speaks integer item ids; this checkpoint's ids are strings")
        return Catalogue(Vocabulary(meta.item_raw_ids), meta.action_values)

    def actions(self, ratings: np.ndarray) -> np.ndarray:
        """Raw ratings (0 = unknown) -> action ids, exactly as in training."""
        if len(self.action_values) == 0:
            return np.zeros(len(ratings), np.int64)
        return np.where(ratings == 0, 0, action_ids(ratings.astype(np.float64), self.action_values))

    def known_candidates(self, raw: np.ndarray, field: str) -> np.ndarray:
        dense, known = self.vocab.to_dense(raw)
        if not known.all():
            raise RequestError(f"{field} holds ids the model has never seen: {_examples(raw[~known])}")
        return dense


@dataclass(frozen=True)
class History:
    items: np.ndarray  # (L,) dense
    timestamps: np.ndarray  # (L,)
    actions: np.ndarray  # (L,) action ids
    num_unknown: int
    num_truncated: int


DEFAULT_LIMITS = Limits()


def parse_history(request: Request, catalogue: Catalogue, max_len: int, limits: Limits = DEFAULT_LIMITS) -> History:
    """Validate one user's history (contract 5). Unknown ids are dropped and counted; a history longer
    than the model's maximum keeps its most recent `max_len` events and counts the rest."""
    items = _row(request, protocol.HISTORY_ITEM_IDS, np.int64)
    timestamps = _row(request, protocol.HISTORY_TIMESTAMPS, np.int64)
    ratings = _row(request, protocol.HISTORY_ACTIONS, np.int64)
    if len(items) == 0:
        raise RequestError(f"'{protocol.HISTORY_ITEM_IDS}' is empty: a user needs at least one event")
    limits.check_history(len(items))
    for name, values in ((protocol.HISTORY_TIMESTAMPS, timestamps), (protocol.HISTORY_ACTIONS, ratings)):
        if len(values) != len(items):
            raise RequestError(f"'{name}' has {len(values)} values but '{protocol.HISTORY_ITEM_IDS}' has {len(items)}")
    problem = validate.history_problem(timestamps, ratings, (protocol.HISTORY_TIMESTAMPS, protocol.HISTORY_ACTIONS))
    if problem is not None:
        raise RequestError(problem)
    dense, known = catalogue.vocab.to_dense(items)
    if not known.any():
        raise RequestError(f"none of the {len(items)} history item ids is known to the model: {_examples(items)}")
    keep = np.flatnonzero(known)[-max_len:]
    return History(
        items=dense[keep],
        timestamps=timestamps[keep],
        actions=catalogue.actions(ratings[keep]),
        num_unknown=int((~known).sum()),
        num_truncated=int(known.sum()) - len(keep),
    )


def _pad(rows: list[np.ndarray], fill: int | float = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad 1-D or N-D rows along their first axis -> (stacked (B, Lmax, ...), lengths (B,))."""
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    out = np.full((len(rows), int(lengths.max()), *rows[0].shape[1:]), fill, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, lengths


def _in_length_groups(rows: list, lengths: np.ndarray, compute) -> list:  # type: ignore[no-untyped-def]
    """compute(sub-list) per length group, results back in the rows' order."""
    results: list = [None] * len(rows)
    for group in length_groups(lengths):
        for i, result in zip(group, compute([rows[i] for i in group]), strict=True):
            results[i] = result
    return results


def _run_valid(requests: list[Request], parse, compute) -> list[Result]:  # type: ignore[no-untyped-def]
    """Parse each request; compute the valid ones as one batch; errors stay with their own request."""
    results: list[Result] = []
    parsed = []
    for request in requests:
        try:
            parsed.append(parse(request))
            results.append({})
        except RequestError as error:
            results.append(error)
    if parsed:
        outputs = iter(compute(parsed))
        results = [r if isinstance(r, Exception) else next(outputs) for r in results]
    return results


class UserEncoder:
    """The first step of every ensemble, so it also checks the limits of the steps after it: `k` and the
    number of candidates arrive here as optional inputs, and a request over a limit costs no prefill."""

    def __init__(self, runtime: Runtime, catalogue: Catalogue, max_len: int, limits: Limits) -> None:
        self.runtime, self.catalogue, self.max_len, self.limits = runtime, catalogue, max_len, limits

    def _parse(self, request: Request) -> History:
        if protocol.K in request:
            self.limits.check_k(_scalar(request, protocol.K))
        if protocol.CANDIDATE_ITEM_IDS in request:
            self.limits.check_candidates(len(_row(request, protocol.CANDIDATE_ITEM_IDS, np.int64)))
        return parse_history(request, self.catalogue, self.max_len, self.limits)

    def execute(self, requests: list[Request]) -> list[Result]:
        return _run_valid(requests, self._parse, self._encode)

    def _encode(self, histories: list[History]) -> list[dict[str, np.ndarray]]:
        return _in_length_groups(histories, np.array([len(h.items) for h in histories]), self._encode_group)

    def _encode_group(self, histories: list[History]) -> list[dict[str, np.ndarray]]:
        items, lengths = _pad([h.items for h in histories])
        timestamps, _ = _pad([h.timestamps for h in histories])
        actions, _ = _pad([h.actions for h in histories])
        out = self.runtime.prefill(items, timestamps, actions, lengths)
        layers, _, _, heads, d_qk = out.keys.shape
        results = []
        for b, h in enumerate(histories):
            n = len(h.items)
            results.append({
                USER_EMBEDDING: out.user[b][None],
                KV_KEYS: out.keys[:, b, :n].reshape(1, layers, n, -1),
                KV_VALUES: out.values[:, b, :n].reshape(1, layers, n, -1),
                KV_TIMESTAMPS: h.timestamps[None],
                protocol.NUM_UNKNOWN: np.array([[h.num_unknown]], np.int32),
                protocol.NUM_TRUNCATED: np.array([[h.num_truncated]], np.int32),
            })
        return results


class CandidateScorer:
    def __init__(self, runtime: Runtime, catalogue: Catalogue, shape: tuple[int, int, int, int], limits: Limits) -> None:
        """shape: (layers, heads, d_qk, d_v) of the model's K/V."""
        self.runtime, self.catalogue, self.shape, self.limits = runtime, catalogue, shape, limits

    def _parse(self, request: Request) -> tuple[np.ndarray, ...]:
        layers, heads, d_qk, d_v = self.shape
        candidates = _row(request, protocol.CANDIDATE_ITEM_IDS, np.int64)
        if len(candidates) == 0:
            raise RequestError(f"'{protocol.CANDIDATE_ITEM_IDS}' is empty")
        self.limits.check_candidates(len(candidates))
        dense = self.catalogue.known_candidates(candidates, f"'{protocol.CANDIDATE_ITEM_IDS}'")
        keys, values = _input(request, KV_KEYS), _input(request, KV_VALUES)
        timestamps = _row(request, KV_TIMESTAMPS, np.int64)
        n = len(timestamps)
        if n == 0:
            raise RequestError(f"'{KV_TIMESTAMPS}' is empty: the cache must hold at least one event")
        problem = validate.history_problem(timestamps, np.zeros(n, np.int64), (KV_TIMESTAMPS, KV_TIMESTAMPS))
        if problem is not None:
            raise RequestError(problem)
        if keys.shape != (1, layers, n, heads * d_qk) or values.shape != (1, layers, n, heads * d_v):
            raise RequestError(f"K/V cache of shape {list(keys.shape)} / {list(values.shape)} does not match "
                               f"this model ({layers} layers, {n} events, {heads} heads)")
        user = _row(request, USER_EMBEDDING, np.float32)
        _require_finite(keys, KV_KEYS)
        _require_finite(values, KV_VALUES)
        _require_finite(user, USER_EMBEDDING)
        k = keys[0].reshape(layers, n, heads, d_qk).transpose(1, 0, 2, 3)  # (L, layers, H, d_qk)
        v = values[0].reshape(layers, n, heads, d_v).transpose(1, 0, 2, 3)
        return k, v, timestamps, user, dense

    def execute(self, requests: list[Request]) -> list[Result]:
        return _run_valid(requests, self._parse, self._score)

    def _score(self, parsed: list[tuple[np.ndarray, ...]]) -> list[dict[str, np.ndarray]]:
        return _in_length_groups(parsed, np.array([len(p[2]) for p in parsed]), self._score_group)

    def _score_group(self, parsed: list[tuple[np.ndarray, ...]]) -> list[dict[str, np.ndarray]]:
        keys, lengths = _pad([p[0] for p in parsed])  # (B, L, layers, H, d)
        values, _ = _pad([p[1] for p in parsed])
        timestamps, _ = _pad([p[2] for p in parsed])
        user = np.stack([p[3] for p in parsed])
        candidates, counts = _pad([p[4] for p in parsed], fill=1)
        scores = self.runtime.score(
            keys.transpose(2, 0, 1, 3, 4), values.transpose(2, 0, 1, 3, 4), timestamps, lengths, user, candidates
        )
        return [{protocol.SCORES: scores[b, :c][None]} for b, c in enumerate(counts)]


class ItemRetrieval:
    """Exact inner-product top-k over the item table, or a FAISS index's approximate one when built with it."""

    def __init__(self, table: np.ndarray, catalogue: Catalogue, limits: Limits, index: object | None = None) -> None:
        self.table = torch.from_numpy(table)
        self.catalogue, self.depth, self.limits, self.index = catalogue, limits.max_k, limits, index

    def _parse(self, request: Request) -> tuple[np.ndarray, np.ndarray]:
        user = _row(request, USER_EMBEDDING, np.float32)
        if user.shape != (self.table.shape[1],):
            raise RequestError(f"'{USER_EMBEDDING}' must have {self.table.shape[1]} values, got {user.shape[0]}")
        _require_finite(user, USER_EMBEDDING)
        exclude = bool(_scalar(request, protocol.EXCLUDE_SEEN)) if protocol.EXCLUDE_SEEN in request else False
        history = _row(request, protocol.HISTORY_ITEM_IDS, np.int64)
        self.limits.check_history(len(history))
        seen = self.catalogue.vocab.to_dense(history)[0]
        return user, seen if exclude else np.zeros(1, np.int64)

    def execute(self, requests: list[Request]) -> list[Result]:
        return _run_valid(requests, self._parse, self._retrieve)

    def _retrieve(self, parsed: list[tuple[np.ndarray, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        users = np.stack([p[0] for p in parsed])
        exclude, _ = _pad([p[1] for p in parsed])
        try:
            if self.index is None:
                found = top_k(torch.from_numpy(users), self.table, self.depth, torch.from_numpy(exclude))
                ids, scores = found[0].numpy(), found[1].numpy()
            else:
                ids, scores = faiss_top_k(self.index, users, self.depth, exclude)
        except ValueError as error:
            raise RequestError(str(error)) from error
        results: list[dict[str, np.ndarray]] = []
        for b in range(len(parsed)):
            found_ids = ids[b][ids[b] > 0]  # fewer than asked: a user who has seen nearly every item, or FAISS
            raw = self.catalogue.vocab.to_raw(found_ids).astype(np.int64)
            results.append({RETRIEVED_ITEM_IDS: raw[None], RETRIEVED_SCORES: scores[b][: len(found_ids)][None]})
        return results


class TopN:
    """The k best candidates by score; ties keep the candidates' order (retrieval's)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def _parse(self, request: Request) -> tuple[np.ndarray, np.ndarray, int]:
        k = _scalar(request, protocol.K)
        self.limits.check_k(k)
        ids = _row(request, RETRIEVED_ITEM_IDS, np.int64)
        if len(ids) > max(self.limits.max_k, self.limits.max_candidates):
            raise RequestError(f"'{RETRIEVED_ITEM_IDS}' has {len(ids)} ids, more than retrieval or rank ever passes")
        scores = _row(request, CANDIDATE_SCORES, np.float32)
        if len(scores) != len(ids):
            raise RequestError(f"'{CANDIDATE_SCORES}' has {len(scores)} values for {len(ids)} '{RETRIEVED_ITEM_IDS}'")
        _require_finite(scores, CANDIDATE_SCORES)
        if k > len(ids):
            raise RequestError(f"'{protocol.K}'={k} exceeds the {len(ids)} candidates retrieved for this user (at "
                               "most the repository's --retrieve-k; fewer when the user has seen nearly every item)")
        return ids, scores, k

    def execute(self, requests: list[Request]) -> list[Result]:
        return _run_valid(requests, self._parse, lambda parsed: [self._top(*p) for p in parsed])

    @staticmethod
    def _top(ids: np.ndarray, scores: np.ndarray, k: int) -> dict[str, np.ndarray]:
        order = np.argsort(-scores, kind="stable")[:k]
        return {protocol.ITEM_IDS: ids[order][None], protocol.SCORES: scores[order][None]}


def load_handler(kind: str, version_dir: Path, parameters: dict[str, str]) -> Handler:
    """Build the handler a served model's ``model.py`` calls, from its version folder's artifacts."""
    meta = load_meta(version_dir / "checkpoint")
    catalogue = Catalogue.from_meta(meta)
    config = meta.model_config
    limits = Limits.from_parameters(parameters)
    if kind == "top_n":
        return TopN(limits)
    if kind == "item_retrieval":
        table = np.load(version_dir / "item_table.npy")
        index_path = version_dir / "item_index.faiss"
        index = load_index(index_path) if index_path.exists() else None
        return ItemRetrieval(table, catalogue, limits, index)
    runtime = _runtime(version_dir, parameters)
    if kind == "user_encoder":
        return UserEncoder(runtime, catalogue, int(config["max_len"]), limits)
    if kind == "candidate_scorer":
        shape = (config["num_layers"], config["num_heads"], config["d_qk"], config["d_v"])
        return CandidateScorer(runtime, catalogue, shape, limits)
    raise ValueError(f"unknown handler {kind!r}")


def _runtime(version_dir: Path, parameters: dict[str, str]) -> Runtime:
    name, device = parameters.get("runtime", "torch"), parameters.get("device", "cpu")
    if name == "torch":
        return TorchRuntime(version_dir / "checkpoint", device)
    if name == "onnx":
        from genrec.builders.onnx_export import OnnxRuntime

        return OnnxRuntime(version_dir / "onnx")
    if name == "tensorrt":
        from genrec.builders.tensorrt_build import TensorRTRuntime

        return TensorRTRuntime(version_dir / "tensorrt", device if device.startswith("cuda") else "cuda")
    raise ValueError(f"unknown runtime {name!r} in {json.dumps(parameters)}")
