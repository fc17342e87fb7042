"""Request data for the serving benchmarks: real ML-100K histories as perf_analyzer and locust send them.

A history is what a caller sends for one user: raw item ids, unix timestamps and raw ratings, oldest first
(the wire format of ``genrec.client.protocol``). The benchmarks sample users at random, so the lengths
follow the dataset's distribution, and each user sends every event but the last (the leave-one-out test
history: what a recommender is asked just before the held-out event), capped at the model's max length.

perf_analyzer's ``--input-data`` JSON (Triton perf_analyzer 2.51): one object per request under ``"data"``,
each tensor as ``{"content": [...], "shape": [...]}`` with the shape *without* the batch dimension (``-b 1``
adds it); BOOL content is JSON ``true``/``false``; large float tensors go as little-endian base64,
``{"content": {"b64": "..."}, "shape": [...]}``. perf_analyzer cycles through the entries in order.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from genrec.client import protocol


@dataclass(frozen=True)
class History:
    """One user's request: raw ids, timestamps and ratings, oldest first."""

    items: np.ndarray  # (L,) int64 raw item ids
    timestamps: np.ndarray  # (L,) int64 unix seconds, non-decreasing
    ratings: np.ndarray  # (L,) int64 raw ratings (0 = unknown)

    def __len__(self) -> int:
        return len(self.items)


def ml100k_histories(num_users: int, max_len: int, seed: int = 0) -> list[History]:
    """``num_users`` users drawn at random (without replacement while there are enough) from ML-100K;
    each history is all of the user's events but the last, keeping the most recent ``max_len``."""
    from genrec.training.prepare import DataConfig, prepare

    data, _, _ = prepare(DataConfig(source="ml-100k"))
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(data.users), size=num_users, replace=num_users > len(data.users))
    ratings_of = np.concatenate([[0.0], data.action_values])  # action id -> raw rating, 0 unknown
    out = []
    for row in rows:
        items, timestamps, actions = data.sequence(int(row))
        keep = slice(max(0, len(items) - 1 - max_len), len(items) - 1)
        out.append(
            History(
                items=data.item_vocab.to_raw(items[keep]).astype(np.int64),
                timestamps=timestamps[keep].astype(np.int64),
                ratings=np.rint(ratings_of[actions[keep]]).astype(np.int64),
            )
        )
    return out


def length_summary(histories: Sequence[History]) -> str:
    lengths = np.array([len(h) for h in histories])
    return (
        f"{len(lengths)} histories, length min {lengths.min()} / median {np.median(lengths):.0f} / "
        f"p90 {np.percentile(lengths, 90):.0f} / max {lengths.max()}"
    )


# ---- perf_analyzer's --input-data JSON ---------------------------------------------------------------------


def tensor_json(array: np.ndarray, b64: bool = False) -> dict[str, Any]:
    """One tensor of one request (no batch dimension)."""
    array = np.asarray(array)
    if b64:
        raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        content: Any = {"b64": base64.b64encode(raw).decode("ascii")}
    else:
        content = array.reshape(-1).tolist()
    return {"content": content, "shape": list(array.shape)}


def recommend_entry(history: History, k: int = 10, exclude_seen: bool = True) -> dict[str, Any]:
    """The inputs of one ``recommend`` / ``retrieve`` request."""
    return {
        protocol.HISTORY_ITEM_IDS: tensor_json(history.items),
        protocol.HISTORY_TIMESTAMPS: tensor_json(history.timestamps),
        protocol.HISTORY_ACTIONS: tensor_json(history.ratings),
        protocol.K: tensor_json(np.array([k], np.int32)),
        protocol.EXCLUDE_SEEN: tensor_json(np.array([exclude_seen])),
    }


def write_input_data(path: Path, entries: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": list(entries)}))
    return path


def read_histories(path: Path) -> list[History]:
    """Histories back from a perf_analyzer JSON of ``recommend`` requests (plain-list contents), so that the
    load generators can share one data file."""
    entries = json.loads(Path(path).read_text())["data"]
    out = []
    for entry in entries:

        def values(name: str, entry: dict[str, Any] = entry) -> np.ndarray:
            tensor = entry[name]
            return np.asarray(tensor["content"] if isinstance(tensor, dict) else tensor, dtype=np.int64)

        items = values(protocol.HISTORY_ITEM_IDS)
        timestamps = values(protocol.HISTORY_TIMESTAMPS) if protocol.HISTORY_TIMESTAMPS in entry else None
        ratings = values(protocol.HISTORY_ACTIONS) if protocol.HISTORY_ACTIONS in entry else None
        out.append(
            History(
                items=items,
                timestamps=timestamps if timestamps is not None else np.zeros(len(items), np.int64),
                ratings=ratings if ratings is not None else np.zeros(len(items), np.int64),
            )
        )
    if not out:
        raise ValueError(f"{path} holds no requests under 'data'")
    return out


def composing_entries(
    url: str, histories: Sequence[History], k: int = 10, exclude_seen: bool = True
) -> dict[str, list[dict[str, Any]]]:
    """Inputs of each composing model, for calling it directly: the real intermediate tensors of each
    history, computed by the running server (user_encoder, then item_retrieval, then candidate_scorer)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    from genrec.builders import handlers as h

    def infer(
        client: grpcclient.InferenceServerClient,
        model: str,
        tensors: dict[str, np.ndarray],
        outputs: Sequence[str],
    ) -> dict[str, np.ndarray]:
        inputs = []
        for name, array in tensors.items():
            batched = np.asarray(array)[None]
            tensor = grpcclient.InferInput(name, list(batched.shape), np_to_triton_dtype(batched.dtype))
            tensor.set_data_from_numpy(batched)
            inputs.append(tensor)
        result = client.infer(
            model, inputs, outputs=[grpcclient.InferRequestedOutput(o) for o in outputs], client_timeout=300
        )
        return {o: result.as_numpy(o)[0] for o in outputs}

    out: dict[str, list[dict[str, Any]]] = {
        "user_encoder": [],
        "item_retrieval": [],
        "candidate_scorer": [],
        "top_n": [],
    }
    exclude = np.array([exclude_seen])
    with grpcclient.InferenceServerClient(url) as client:
        for history in histories:
            request = {
                protocol.HISTORY_ITEM_IDS: history.items,
                protocol.HISTORY_TIMESTAMPS: history.timestamps,
                protocol.HISTORY_ACTIONS: history.ratings,
            }
            cache_names = (h.USER_EMBEDDING, h.KV_KEYS, h.KV_VALUES, h.KV_TIMESTAMPS)
            cache = infer(client, "user_encoder", request, cache_names)
            retrieval_in = {
                h.USER_EMBEDDING: cache[h.USER_EMBEDDING],
                protocol.HISTORY_ITEM_IDS: history.items,
                protocol.EXCLUDE_SEEN: exclude,
            }
            retrieved = infer(client, "item_retrieval", retrieval_in, (h.RETRIEVED_ITEM_IDS,))
            scorer_in = {**cache, protocol.CANDIDATE_ITEM_IDS: retrieved[h.RETRIEVED_ITEM_IDS]}
            scores = infer(client, "candidate_scorer", scorer_in, (protocol.SCORES,))
            out["user_encoder"].append({name: tensor_json(a) for name, a in request.items()})
            out["item_retrieval"].append(
                {
                    h.USER_EMBEDDING: tensor_json(cache[h.USER_EMBEDDING], b64=True),
                    protocol.HISTORY_ITEM_IDS: tensor_json(history.items),
                    protocol.EXCLUDE_SEEN: tensor_json(exclude),
                }
            )
            out["candidate_scorer"].append(
                {
                    h.USER_EMBEDDING: tensor_json(cache[h.USER_EMBEDDING], b64=True),
                    h.KV_KEYS: tensor_json(cache[h.KV_KEYS], b64=True),
                    h.KV_VALUES: tensor_json(cache[h.KV_VALUES], b64=True),
                    h.KV_TIMESTAMPS: tensor_json(cache[h.KV_TIMESTAMPS]),
                    protocol.CANDIDATE_ITEM_IDS: tensor_json(retrieved[h.RETRIEVED_ITEM_IDS]),
                }
            )
            out["top_n"].append(
                {
                    h.RETRIEVED_ITEM_IDS: tensor_json(retrieved[h.RETRIEVED_ITEM_IDS]),
                    h.CANDIDATE_SCORES: tensor_json(scores[protocol.SCORES], b64=True),
                    protocol.K: tensor_json(np.array([k], np.int32)),
                }
            )
    return out
