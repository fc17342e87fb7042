"""What each served model does, as plain numpy-in / numpy-out code tested without Triton.

The Python backend's ``model.py`` is a thin adapter: it turns each request into a dict of numpy arrays,
calls ``Handler.execute`` once per batch of requests, and turns each result (or ``RequestError``) into a
response. One request is one user; every array has a leading batch dimension of 1.

    user_encoder      history (raw ids) -> user embedding + per-layer K/V of the history
    item_retrieval    user embedding -> the `retrieve_k` best items (history optionally excluded)
    candidate_scorer  K/V + user embedding + candidate ids -> one score per candidate
    top_n             candidates + scores + k -> the k best, ordered
    recommender       recommend and rank fused in one model: history (+ user id) -> the k best, or the
                      caller's candidates' scores; with a user id, the user's K/V is kept (`UserCache`)
                      and a returning user's appended events are all that is computed
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from genrec.builders.limits import Cancelled, Limits, RequestError
from genrec.builders.requests import (
    Catalogue,
    History,
    Request,
    Result,
    parse_history,
    require_finite,
    row,
    scalar,
    tensor,
)
from genrec.builders.runtimes import Prefilled, Runtime, Stateless, TorchRuntime, UserRuntime, UserState, pad
from genrec.builders.user_cache import UserCache
from genrec.client import protocol, validate
from genrec.training.batch import length_groups
from genrec.training.checkpoint import load_meta
from genrec.training.retrieval import faiss_top_k, load_index, top_k

# Tensors between composing models (inside the ensembles; the public ones are in genrec.client.protocol).
USER_EMBEDDING = "user_embedding"  # FP32 [D]
KV_KEYS = "kv_keys"  # FP32 [layers, L, H * d_qk]
KV_VALUES = "kv_values"  # FP32 [layers, L, H * d_v]
KV_TIMESTAMPS = "kv_timestamps"  # INT64 [L]
CANDIDATE_SCORES = "candidate_scores"  # FP32 [C]
RETRIEVED_ITEM_IDS = "retrieved_item_ids"  # INT64 [R]
RETRIEVED_SCORES = "retrieved_scores"  # FP32 [R]

class Handler(Protocol):
    def execute(self, requests: list[Request]) -> list[Result]: ...


# The most attention pairs (rows x longest history^2) one prefill pass computes. Past this, a padded batch is
# no faster than its users one by one, and its (B, L, L) bias and masks outgrow the CPU's caches. Measured on
# 2 cores (ms per user, reference size, one by one -> in passes of 2-16): 50 events 1.23 -> 0.55 (16),
# 200 events 2.97 -> 2.52 (4), 500 events 8.7 -> 8.0 (2), 9.0 (4); 1,000 events 27.3 -> 26.9 (2), 51.8 (16).
PREFILL_PAIRS = 1 << 19


def _in_length_groups(rows: list, lengths: np.ndarray, compute, max_pairs: int | None = None) -> list:  # type: ignore[no-untyped-def]
    """compute(sub-list) per length group (rows x longest^2 under ``max_pairs``), results back in the rows' order."""
    results: list = [None] * len(rows)
    for group in length_groups(lengths, max_pairs=max_pairs):
        for i, result in zip(group, compute([rows[i] for i in group]), strict=True):
            results[i] = result
    return results


def _similar(rows: list[int], lengths: list[int], counts: list[int]) -> list[list[int]]:
    """`rows` in groups of similar history length and, within those, similar count (of candidates to score,
    or of new events to append): run together they pad little (a maximal `rank` never pads a `recommend`
    of its batch to its candidate count)."""
    if not rows:
        return []
    groups = []
    for by_length in length_groups(np.array(lengths)):
        for by_count in length_groups(np.array(counts)[by_length]):
            groups.append([rows[int(j)] for j in by_length[by_count]])
    return groups


def _run_valid(requests: Sequence[object], parse, compute) -> list[Result]:  # type: ignore[no-untyped-def]
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
    """The first step of `retrieve`, so it also checks the limit of the steps after it: `k` arrives here as an
    optional input, and a request over the limit costs no prefill."""

    def __init__(self, runtime: Runtime, catalogue: Catalogue, max_len: int, limits: Limits, block: int = 1) -> None:
        self.runtime, self.catalogue, self.max_len, self.limits, self.block = runtime, catalogue, max_len, limits, block

    def _parse(self, request: Request) -> History:
        if protocol.K in request:
            self.limits.check_k(scalar(request, protocol.K))
        return parse_history(request, self.catalogue, self.max_len, self.limits, self.block)

    def execute(self, requests: list[Request]) -> list[Result]:
        return _run_valid(requests, self._parse, self._encode)

    def _encode(self, histories: list[History]) -> list[dict[str, np.ndarray]]:
        return _in_length_groups(histories, np.array([len(h.items) for h in histories]), self._encode_group,
                                 PREFILL_PAIRS)

    def _encode_group(self, histories: list[History]) -> list[dict[str, np.ndarray]]:
        items, lengths = pad([h.items for h in histories])
        timestamps, _ = pad([h.timestamps for h in histories])
        actions, _ = pad([h.actions for h in histories])
        out = self.runtime.prefill(items, timestamps, actions, lengths)
        _, layers, _, heads, d_qk = out.keys.shape
        results = []
        for b, h in enumerate(histories):
            n = len(h.items)
            results.append({
                USER_EMBEDDING: out.user[b][None],
                KV_KEYS: out.keys[b : b + 1, :, :n].reshape(1, layers, n, -1),
                KV_VALUES: out.values[b : b + 1, :, :n].reshape(1, layers, n, -1),
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
        candidates = row(request, protocol.CANDIDATE_ITEM_IDS, np.int64)
        if len(candidates) == 0:
            raise RequestError(f"'{protocol.CANDIDATE_ITEM_IDS}' is empty")
        self.limits.check_candidates(len(candidates))
        dense = self.catalogue.known_candidates(candidates, f"'{protocol.CANDIDATE_ITEM_IDS}'")
        keys, values = tensor(request, KV_KEYS), tensor(request, KV_VALUES)
        timestamps = row(request, KV_TIMESTAMPS, np.int64)
        n = len(timestamps)
        if n == 0:
            raise RequestError(f"'{KV_TIMESTAMPS}' is empty: the cache must hold at least one event")
        problem = validate.history_problem(timestamps, np.zeros(n, np.int64), (KV_TIMESTAMPS, KV_TIMESTAMPS))
        if problem is not None:
            raise RequestError(problem)
        if keys.shape != (1, layers, n, heads * d_qk) or values.shape != (1, layers, n, heads * d_v):
            raise RequestError(f"K/V cache of shape {list(keys.shape)} / {list(values.shape)} does not match "
                               f"this model ({layers} layers, {n} events, {heads} heads)")
        user = row(request, USER_EMBEDDING, np.float32)
        require_finite(keys, KV_KEYS)
        require_finite(values, KV_VALUES)
        require_finite(user, USER_EMBEDDING)
        k = keys[0].reshape(layers, n, heads, d_qk)
        v = values[0].reshape(layers, n, heads, d_v)
        return k, v, timestamps, user, dense

    def execute(self, requests: list[Request]) -> list[Result]:
        return _run_valid(requests, self._parse, self._score)

    def _score(self, parsed: list[tuple[np.ndarray, ...]]) -> list[dict[str, np.ndarray]]:
        return _in_length_groups(parsed, np.array([len(p[2]) for p in parsed]), self._score_group)

    def _score_group(self, parsed: list[tuple[np.ndarray, ...]]) -> list[dict[str, np.ndarray]]:
        keys, lengths = pad([p[0] for p in parsed], axis=1)  # (B, layers, L, H, d)
        values, _ = pad([p[1] for p in parsed], axis=1)
        timestamps, _ = pad([p[2] for p in parsed])
        user = np.stack([p[3] for p in parsed])
        candidates, counts = pad([p[4] for p in parsed], fill=1)
        cache = Prefilled(keys, values, user)
        scores = self.runtime.score(cache, timestamps, lengths, candidates)
        return [{protocol.SCORES: scores[b, :c][None]} for b, c in enumerate(counts)]


class ItemRetrieval:
    """Exact inner-product top-k over the item table, or a FAISS index's approximate one when built with it."""

    def __init__(self, table: np.ndarray, catalogue: Catalogue, limits: Limits, index: object | None = None) -> None:
        self.table = torch.from_numpy(table)
        self.catalogue, self.depth, self.limits, self.index = catalogue, limits.max_k, limits, index

    def _parse(self, request: Request) -> tuple[np.ndarray, np.ndarray]:
        user = row(request, USER_EMBEDDING, np.float32)
        if user.shape != (self.table.shape[1],):
            raise RequestError(f"'{USER_EMBEDDING}' must have {self.table.shape[1]} values, got {user.shape[0]}")
        require_finite(user, USER_EMBEDDING)
        exclude = bool(scalar(request, protocol.EXCLUDE_SEEN)) if protocol.EXCLUDE_SEEN in request else False
        history = row(request, protocol.HISTORY_ITEM_IDS, np.int64)
        self.limits.check_history(len(history))
        seen = self.catalogue.vocab.to_dense(history)[0]
        return user, seen if exclude else np.zeros(1, np.int64)

    def execute(self, requests: list[Request]) -> list[Result]:
        return _run_valid(requests, self._parse, self._retrieve)

    def search(self, users: np.ndarray, exclude: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Users (B, D), each one's dense ids to leave out -> per user, the best dense ids and their scores:
        fewer than `retrieve_k` for a user who has seen nearly every item (or from FAISS)."""
        padded, _ = pad(exclude)
        if self.index is None:
            found = top_k(torch.from_numpy(users), self.table, self.depth, torch.from_numpy(padded))
            ids, scores = found[0].numpy(), found[1].numpy()
        else:
            ids, scores = faiss_top_k(self.index, users, self.depth, padded)
        return [(ids[b][ids[b] > 0], scores[b][ids[b] > 0]) for b in range(len(users))]

    def _retrieve(self, parsed: list[tuple[np.ndarray, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        results: list[dict[str, np.ndarray]] = []
        for ids, scores in self.search(np.stack([p[0] for p in parsed]), [p[1] for p in parsed]):
            raw = self.catalogue.vocab.to_raw(ids).astype(np.int64)
            results.append({RETRIEVED_ITEM_IDS: raw[None], RETRIEVED_SCORES: scores[None]})
        return results


class TopN:
    """The k best candidates by score; ties keep the candidates' order (retrieval's). Fewer than k
    candidates (a user who has seen nearly every item) give all of them: a valid, shorter answer."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def _parse(self, request: Request) -> tuple[np.ndarray, np.ndarray, int]:
        k = scalar(request, protocol.K)
        self.limits.check_k(k)
        ids = row(request, RETRIEVED_ITEM_IDS, np.int64)
        if len(ids) > max(self.limits.max_k, self.limits.max_candidates):
            raise RequestError(f"'{RETRIEVED_ITEM_IDS}' has {len(ids)} ids, more than retrieval or rank ever passes")
        scores = row(request, CANDIDATE_SCORES, np.float32)
        if len(scores) != len(ids):
            raise RequestError(f"'{CANDIDATE_SCORES}' has {len(scores)} values for {len(ids)} '{RETRIEVED_ITEM_IDS}'")
        require_finite(scores, CANDIDATE_SCORES)
        return ids, scores, k

    def execute(self, requests: list[Request]) -> list[Result]:
        return _run_valid(requests, self._parse, lambda parsed: [self.top(*p) for p in parsed])

    @staticmethod
    def top(ids: np.ndarray, scores: np.ndarray, k: int) -> dict[str, np.ndarray]:
        order = np.argsort(-scores, kind="stable")[:k]
        return {protocol.ITEM_IDS: ids[order][None], protocol.SCORES: scores[order][None]}


def _user_id(request: Request) -> bytes | None:
    if protocol.USER_ID not in request:
        return None
    value = tensor(request, protocol.USER_ID)
    if value.shape != (1, 1):
        raise RequestError(f"'{protocol.USER_ID}' must have shape [1, 1], got {list(value.shape)}")
    user_id = value[0, 0]
    user_id = user_id.encode() if isinstance(user_id, str) else user_id
    if not isinstance(user_id, bytes) or not 0 < len(user_id) <= protocol.MAX_USER_ID_BYTES:
        raise RequestError(f"'{protocol.USER_ID}' must be 1 to {protocol.MAX_USER_ID_BYTES} bytes")
    return user_id


@dataclass(frozen=True)
class UserRequest:
    """One parsed `recommend` (``k`` set) or `rank` (``candidates`` set) request."""

    history: History
    user_id: bytes | None
    k: int | None
    exclude_seen: bool
    candidates: np.ndarray | None  # dense ids
    gone: Callable[[], bool] = lambda: False  # whether the caller has cancelled (Triton's is_cancelled)


class Recommender:
    """`recommend` and `rank` in one model, so the K/V never leaves the process that computed it.

    With a ``cache``, a request that names its user reuses the K/V of that user's last history when the new
    one extends it, computing only the appended events; anything else is recomputed and replaces the entry.
    The cached answer equals the uncached one: both read the same window (`window_start`).
    """

    def __init__(self, runtime: UserRuntime, retrieval: ItemRetrieval, catalogue: Catalogue, max_len: int,
                 block: int, limits: Limits, cache: UserCache | None, chunk: int = 512) -> None:
        if cache is not None and not runtime.can_extend:
            raise ValueError("the user cache needs a runtime that can append events (runtime='torch')")
        self.runtime, self.retrieval, self.catalogue = runtime, retrieval, catalogue
        self.max_len, self.block, self.limits, self.cache, self.chunk = max_len, block, limits, cache, chunk

    def _parse(self, request: Request) -> UserRequest:
        candidates = k = None
        if protocol.CANDIDATE_ITEM_IDS in request:
            candidate_ids = row(request, protocol.CANDIDATE_ITEM_IDS, np.int64)
            if len(candidate_ids) == 0:
                raise RequestError(f"'{protocol.CANDIDATE_ITEM_IDS}' is empty")
            self.limits.check_candidates(len(candidate_ids))
            candidates = self.catalogue.known_candidates(candidate_ids, f"'{protocol.CANDIDATE_ITEM_IDS}'")
        elif protocol.K in request:
            k = scalar(request, protocol.K)
            self.limits.check_k(k)
        else:
            raise RequestError(f"give '{protocol.K}' (recommend) or '{protocol.CANDIDATE_ITEM_IDS}' (rank)")
        exclude = bool(scalar(request, protocol.EXCLUDE_SEEN)) if protocol.EXCLUDE_SEEN in request else False
        user_id = _user_id(request)
        history = parse_history(request, self.catalogue, self.max_len, self.limits, self.block)
        return UserRequest(history, user_id, k, exclude, candidates)

    def execute(self, requests: list[Request], gone: Sequence[Callable[[], bool]] = ()) -> list[Result]:
        """``gone``: per request, whether its caller has gone (Triton's ``is_cancelled``, one message to the
        server each, so it is asked only between chunks of ``chunk`` candidates: model.py asks once before);
        a maximal `rank` whose caller cancelled stops holding the model after its current chunk."""
        with_gone = list(zip(requests, gone or [lambda: False] * len(requests), strict=True))
        return _run_valid(with_gone, lambda pair: replace(self._parse(pair[0]), gone=pair[1]), self._serve)

    def _serve(self, parsed: list[UserRequest]) -> list[Result]:
        states = self._states(parsed)
        recommend = [i for i, p in enumerate(parsed) if p.candidates is None]
        retrieved: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if recommend:  # one search for the batch's recommend requests
            users = np.stack([states[i][0].user for i in recommend])
            exclude = [parsed[i].history.seen if parsed[i].exclude_seen else np.zeros(1, np.int64) for i in recommend]
            retrieved = dict(zip(recommend, self.retrieval.search(users, exclude), strict=True))
        candidates = [p.candidates if p.candidates is not None else retrieved[i][0] for i, p in enumerate(parsed)]
        scores: list[np.ndarray] = [np.zeros(0, np.float32)] * len(parsed)
        scored = [i for i, c in enumerate(candidates) if len(c)]  # a user who has seen everything: nothing to score
        gone: set[int] = set()
        for rows in _similar(scored, [len(parsed[i].history.items) for i in scored], [len(candidates[i]) for i in scored]):
            parts: dict[int, list[np.ndarray]] = {i: [] for i in rows}
            for start in range(0, max(len(candidates[i]) for i in rows), self.chunk):
                if start:
                    gone |= {i for i in rows if i not in gone and parsed[i].gone()}
                todo = [i for i in rows if i not in gone and start < len(candidates[i])]
                if not todo:
                    continue
                found = self.runtime.score_states([states[i][0] for i in todo],
                                                  [candidates[i][start : start + self.chunk] for i in todo])
                for i, score in zip(todo, found, strict=True):
                    parts[i].append(score)
            for i in rows:
                scores[i] = np.concatenate(parts[i]) if parts[i] else scores[i]
        results: list[Result] = []
        for j, (p, (_, cached), ids, score) in enumerate(zip(parsed, states, candidates, scores, strict=True)):
            if j in gone:
                results.append(Cancelled("the caller went away while its candidates were scored"))
                continue
            report = {
                protocol.NUM_UNKNOWN: np.array([[p.history.num_unknown]], np.int32),
                protocol.NUM_TRUNCATED: np.array([[p.history.num_truncated]], np.int32),
                protocol.CACHED_EVENTS: np.array([[cached]], np.int32),
            }
            if p.k is None:  # rank: the caller's candidates, in their order
                results.append({protocol.SCORES: score[None], **report})
            else:
                results.append({**TopN.top(self.catalogue.vocab.to_raw(ids).astype(np.int64), score, p.k), **report})
        return results

    def _states(self, parsed: list[UserRequest]) -> list[tuple[UserState, int]]:
        """Each user's state and how many of its events came from the cache. A user named twice in a batch is
        served in turn (the second request sees what the first stored), the others together."""
        out: dict[int, tuple[UserState, int]] = {}
        waves: list[dict[bytes | int, int]] = []  # per wave, user id (or request index) -> request
        for i, p in enumerate(parsed):
            key = i if p.user_id is None else p.user_id
            wave = next((w for w in waves if key not in w), None)
            if wave is None:
                waves.append(wave := {})
            wave[key] = i
        for wave in waves:
            rows = list(wave.values())
            out.update(zip(rows, self._wave_states([parsed[i] for i in rows]), strict=True))
        return [out[i] for i in range(len(parsed))]

    def _wave_states(self, parsed: list[UserRequest]) -> list[tuple[UserState, int]]:
        """`_states` for requests of distinct users: returning users' new events are computed together, in
        groups of similar length."""
        states: dict[int, tuple[UserState, int]] = {}
        extend: list[tuple[int, UserState, int]] = []  # (request, cached state, its events)
        encode: list[int] = []  # requests computed from scratch
        for i, p in enumerate(parsed):
            h = p.history
            entry = None
            if p.user_id is not None and self.cache is not None:
                entry = self.cache.lookup(p.user_id, h.raw, h.num_truncated).entry
            if entry is None:
                encode.append(i)
            elif entry.num_events == len(h.items):
                states[i] = entry.state, entry.num_events
            else:
                extend.append((i, entry.state, entry.num_events))
        for group in length_groups(np.array([len(parsed[i].history.items) for i in encode]), max_pairs=PREFILL_PAIRS):
            rows = [encode[int(j)] for j in group]
            for i, state in zip(rows, self.runtime.encode_states([parsed[i].history.events() for i in rows]),
                                strict=True):
                states[i] = state, 0
        lengths, new = [n for _, _, n in extend], [len(parsed[i].history.items) - n for i, _, n in extend]
        for group in _similar(list(range(len(extend))), lengths, new):
            events = [parsed[extend[j][0]].history.events(extend[j][2]) for j in group]
            for j, state in zip(group, self.runtime.extend_states([extend[j][1] for j in group], events), strict=True):
                states[extend[j][0]] = state, extend[j][2]
        done = [states[i] for i in range(len(parsed))]
        for p, (state, cached) in zip(parsed, done, strict=True):
            if p.user_id is not None and self.cache is not None:
                h = p.history
                self.cache.store(p.user_id, h.raw, h.num_truncated, len(h.items), state, appended=len(h.items) - cached)
        return done


def load_handler(kind: str, version_dir: Path, parameters: dict[str, str]) -> Handler:
    """Build the handler a served model's ``model.py`` calls, from its version folder's artifacts."""
    meta = load_meta(version_dir / "checkpoint")
    catalogue = Catalogue.from_meta(meta)
    config = meta.hstu_config()
    limits = Limits.from_parameters(parameters)
    threads = int(parameters.get("threads", 0))
    if threads > 0:
        torch.set_num_threads(threads)
    if kind == "top_n":
        return TopN(limits)
    max_len, block = config.max_len, int(parameters.get("window_block", 1))
    if kind in ("item_retrieval", "recommender"):
        table = np.load(version_dir / "item_table.npy")
        index_path = version_dir / "item_index.faiss"
        index = load_index(index_path) if index_path.exists() else None
        retrieval = ItemRetrieval(table, catalogue, limits, index)
        if kind == "item_retrieval":
            return retrieval
    runtime = _runtime(version_dir, parameters)
    if kind == "recommender":
        cache_bytes = int(float(parameters.get("user_cache_mb", 0)) * 2**20)
        cache = UserCache(cache_bytes, float(parameters.get("user_cache_ttl_s", 0))) if cache_bytes else None
        user_runtime = runtime if isinstance(runtime, TorchRuntime) else Stateless(runtime)
        return Recommender(user_runtime, retrieval, catalogue, max_len, block, limits, cache, config.score_chunk)
    if kind == "user_encoder":
        return UserEncoder(runtime, catalogue, max_len, limits, block)
    if kind == "candidate_scorer":
        shape = (config.num_layers, config.num_heads, config.d_qk, config.d_v)
        return CandidateScorer(runtime, catalogue, shape, limits)
    raise ValueError(f"unknown handler {kind!r}")


def _runtime(version_dir: Path, parameters: dict[str, str]) -> Runtime:
    name, device = parameters.get("runtime", "torch"), parameters.get("device", "cpu")
    if name == "torch":
        return TorchRuntime(version_dir / "checkpoint", device)
    if name == "onnx":
        from genrec.builders.onnx_export import OnnxRuntime

        # the build's device and thread count, as for torch (CUDA needs the onnxruntime-gpu build; without it
        # OnnxRuntime warns and runs on the CPU)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
        return OnnxRuntime(version_dir / "onnx", providers, int(parameters.get("threads", 0)))
    if name == "tensorrt":
        from genrec.builders.tensorrt_build import TensorRTRuntime

        return TensorRTRuntime(version_dir / "tensorrt", device if device.startswith("cuda") else "cuda")
    raise ValueError(f"unknown runtime {name!r} in {json.dumps(parameters)}")
