"""The served API: names, dtypes and shapes of the ensembles' tensors.

This module is the one source of truth for the wire format. The builders render the Triton
configs from it and the client builds its requests from it, so the two cannot drift apart.
Every ensemble has ``max_batch_size > 0``: one request carries one user, shape ``[1, L]``, and
Triton's dynamic batcher groups users of different history lengths (ragged batching).
Item ids are the raw ids of the user's data (integers), never the model's dense indices.
"""

from __future__ import annotations

from dataclasses import dataclass

# Ensemble (public model) names.
RECOMMEND = "recommend"  # history -> retrieve -> re-rank -> top-k items and scores
RANK = "rank"  # history + caller-supplied candidates -> one score per candidate
RETRIEVE = "retrieve"  # history -> top-k items by the retrieval score

# Inputs.
HISTORY_ITEM_IDS = "history_item_ids"  # INT64 [L], oldest first
HISTORY_TIMESTAMPS = "history_timestamps"  # INT64 [L], unix seconds in TIMESTAMP_RANGE, non-decreasing
HISTORY_ACTIONS = "history_actions"  # INT64 [L], the rating/action per event, 0 = unknown
K = "k"  # INT32 [1], how many items to return
EXCLUDE_SEEN = "exclude_seen"  # BOOL [1], drop items already in the history
CANDIDATE_ITEM_IDS = "candidate_item_ids"  # INT64 [C], for `rank`
USER_ID = "user_id"  # BYTES [1], optional (recommend, rank): the server keeps this user's K/V for next time

# Outputs.
ITEM_IDS = "item_ids"  # INT64 [k], best first
SCORES = "scores"  # FP32 [k] (recommend/retrieve) or [C] (rank, in candidate order)
NUM_UNKNOWN = "num_unknown"  # INT32 [1], history ids the model has never seen (ignored)
NUM_TRUNCATED = "num_truncated"  # INT32 [1], oldest events dropped beyond the model's max length
CACHED_EVENTS = "cached_events"  # INT32 [1] (recommend, rank), history events whose K/V came from the user cache

# Accepted history timestamps, unix seconds: [1970-01-01, 2100-01-01). The time bias only sees gaps, so any
# era would do; this one catches the common unit mistake (milliseconds: 1.7e12 is the year 55,000) and
# int64 extremes. A checkpoint trained without time ignores the values (send 0).
TIMESTAMP_RANGE = (0, 4_102_444_800)


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton's dtype name without the TYPE_ prefix: INT64, INT32, FP32, BOOL
    dims: tuple[int, ...]  # per request, without the batch dimension; -1 = variable
    optional: bool = False  # a request may leave it out (inputs only)


HISTORY_INPUTS = (
    Tensor(HISTORY_ITEM_IDS, "INT64", (-1,)),
    Tensor(HISTORY_TIMESTAMPS, "INT64", (-1,)),
    Tensor(HISTORY_ACTIONS, "INT64", (-1,)),
)
TOP_K_INPUTS = (Tensor(K, "INT32", (1,)), Tensor(EXCLUDE_SEEN, "BOOL", (1,)))
HISTORY_REPORT = (Tensor(NUM_UNKNOWN, "INT32", (1,)), Tensor(NUM_TRUNCATED, "INT32", (1,)))
TOP_K_OUTPUTS = (Tensor(ITEM_IDS, "INT64", (-1,)), Tensor(SCORES, "FP32", (-1,)), *HISTORY_REPORT)
USER_ID_INPUT = Tensor(USER_ID, "BYTES", (1,), optional=True)
CACHE_REPORT = Tensor(CACHED_EVENTS, "INT32", (1,))
MAX_USER_ID_BYTES = 256


@dataclass(frozen=True)
class Endpoint:
    model: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


ENDPOINTS = {
    RECOMMEND: Endpoint(RECOMMEND, HISTORY_INPUTS + TOP_K_INPUTS + (USER_ID_INPUT,), TOP_K_OUTPUTS + (CACHE_REPORT,)),
    RETRIEVE: Endpoint(RETRIEVE, HISTORY_INPUTS + TOP_K_INPUTS, TOP_K_OUTPUTS),
    RANK: Endpoint(
        RANK,
        HISTORY_INPUTS + (Tensor(CANDIDATE_ITEM_IDS, "INT64", (-1,)), USER_ID_INPUT),
        (Tensor(SCORES, "FP32", (-1,)), *HISTORY_REPORT, CACHE_REPORT),
    ),
}
