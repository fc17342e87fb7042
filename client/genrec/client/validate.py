"""Client-side checks of user input, done once at the boundary.

Each function turns what the caller passed (lists, tuples, numpy arrays, pandas Series) into the
exact numpy arrays of the wire format, or raises `GenrecError` naming the field and the value.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Set
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import protocol
from .errors import GenrecError

_INT64 = np.iinfo(np.int64)
_INT32_MAX = int(np.iinfo(np.int32).max)


@dataclass(frozen=True)
class History:
    """One user's validated history, oldest event first; the three arrays have the same length L."""

    item_ids: np.ndarray  # int64 (L,), raw item ids
    timestamps: np.ndarray  # int64 (L,), unix seconds, non-decreasing
    actions: np.ndarray  # int64 (L,), >= 0, 0 = unknown


def _bad(message: str) -> GenrecError:
    return GenrecError(message, status="INVALID_ARGUMENT")


def _vector(value: Any, field: str) -> np.ndarray:
    """Any 1-D sequence -> a 1-D numpy array; python ints beyond int64 are refused, not wrapped."""
    if value is None or isinstance(value, (str, bytes)):
        raise _bad(f"{field} must be a 1-D sequence of numbers, got {value!r}")
    if isinstance(value, (Set, Mapping)):
        raise _bad(f"{field} must be an ordered sequence (list, tuple, numpy array), got a {type(value).__name__}")
    if isinstance(value, Iterator):
        value = list(value)  # a generator or an iterator: its items, in order
    if isinstance(value, (list, tuple)):
        for i, x in enumerate(value):
            if isinstance(x, int) and not isinstance(x, bool) and not _INT64.min <= x <= _INT64.max:
                raise _bad(f"{field}[{i}]={x} is outside the int64 range")
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise _bad(f"{field} must be a 1-D sequence of numbers: {exc}") from None
    if array.ndim != 1:
        raise _bad(f"{field} must be 1-D, got shape {array.shape}")
    return array


def _first(array: np.ndarray, field: str) -> str:
    return f"{field}[0]={array[0]!r}" if array.size else f"{field}=[]"


def _int64(array: np.ndarray, field: str) -> np.ndarray:
    """An integer array -> int64 (L,); floats, bools, strings and objects are refused."""
    kind = array.dtype.kind
    if kind == "i" or (kind == "f" and array.size == 0):
        return array.astype(np.int64, copy=False)
    if kind == "u":
        if array.size and int(array.max()) > _INT64.max:
            i = int(np.argmax(array > _INT64.max))
            raise _bad(f"{field}[{i}]={int(array[i])} is outside the int64 range")
        return array.astype(np.int64)
    raise _bad(f"{field} must be integers, got dtype {array.dtype} ({_first(array, field)})")


def item_ids(value: Any, field: str) -> np.ndarray:
    """Raw item ids -> int64 (L,), L >= 1."""
    ids = _int64(_vector(value, field), field)
    if ids.size == 0:
        raise _bad(f"{field} is empty: at least one item id is needed")
    return ids


def timestamps(value: Any, length: int, field: str) -> np.ndarray:
    """Unix seconds (integers, or floats holding whole seconds) -> int64 (L,); `history_problem` rules."""
    array = _vector(value, field)
    if array.shape[0] != length:
        raise _bad(f"{field} has {array.shape[0]} values but the history has {length} items")
    if array.dtype.kind == "f":
        whole = np.isfinite(array) & (np.rint(array) == array)
        if not whole.all():
            i = int(np.argmin(whole))
            raise _bad(f"{field}[{i}]={array[i]} is not a whole number of seconds")
        low, high = protocol.TIMESTAMP_RANGE
        array = np.clip(array, low - 1, high).astype(np.int64)  # out-of-range stays out of range, unwrapped
    return _int64(array, field)


def actions(value: Any, length: int, field: str) -> np.ndarray:
    """Action/rating codes -> int64 (L,); `history_problem` rules."""
    array = _vector(value, field)
    if array.shape[0] != length:
        raise _bad(f"{field} has {array.shape[0]} values but the history has {length} items")
    return _int64(array, field)


def history_problem(timestamps_: np.ndarray, actions_: np.ndarray, fields: tuple[str, str]) -> str | None:
    """What is wrong with a history's int64 timestamps and actions, naming the field; None if nothing.

    The one statement of the rule: the client checks it before sending, every served model on arrival.
    """
    ts_field, act_field = fields
    low, high = protocol.TIMESTAMP_RANGE
    outside = (timestamps_ < low) | (timestamps_ >= high)
    if outside.any():
        i = int(np.argmax(outside))
        return (f"{ts_field}[{i}]={timestamps_[i]} is not unix seconds in [{low}, {high}) "
                "(1970 to 2100; milliseconds are 1000 times too large)")
    decreasing = np.diff(timestamps_) < 0
    if decreasing.any():
        i = int(np.argmax(decreasing)) + 1
        return (f"{ts_field} must be non-decreasing (oldest event first): "
                f"{ts_field}[{i}]={timestamps_[i]} < {ts_field}[{i - 1}]={timestamps_[i - 1]}")
    negative = actions_ < 0
    if negative.any():
        i = int(np.argmax(negative))
        return f"{act_field}[{i}]={actions_[i]} is negative (0 means unknown)"
    return None


def history(
    user_seq: Any,
    timestamps_: Any | None,
    actions_: Any | None,
    *,
    now: int,
    fields: tuple[str, str, str] = ("user_seq", "timestamps", "actions"),
) -> History:
    """The full history; missing timestamps are all ``now`` (zero time gaps), missing actions are 0."""
    seq_field, ts_field, act_field = fields
    ids = item_ids(user_seq, seq_field)
    n = ids.shape[0]
    ts = np.full(n, now, dtype=np.int64) if timestamps_ is None else timestamps(timestamps_, n, ts_field)
    act = np.zeros(n, dtype=np.int64) if actions_ is None else actions(actions_, n, act_field)
    problem = history_problem(ts, act, (ts_field, act_field))
    if problem is not None:
        raise _bad(problem)
    return History(ids, ts, act)


def k(value: Any, field: str = "k") -> int:
    """A positive integer that fits the INT32 `k` input."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise _bad(f"{field} must be a positive integer, got {value!r}")
    if not 1 <= int(value) <= _INT32_MAX:
        raise _bad(f"{field} must be a positive integer (at most {_INT32_MAX}), got {int(value)}")
    return int(value)


def flag(value: Any, field: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise _bad(f"{field} must be True or False, got {value!r}")
    return bool(value)


def per_user(value: Any | None, n_users: int, field: str) -> list[Any | None]:
    """A batch argument given per user (or None for all users) -> one entry per user."""
    if value is None:
        return [None] * n_users
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise _bad(f"{field} must be a sequence with one entry per user, got {value!r}")
    if len(value) != n_users:
        raise _bad(f"{field} has {len(value)} entries but there are {n_users} users")
    return list(value)


def n_users(user_seqs: Any) -> int:
    """The number of users of a batch call (at least one)."""
    if isinstance(user_seqs, (str, bytes)) or not hasattr(user_seqs, "__len__"):
        raise _bad(f"user_seqs must be a sequence of histories, got {user_seqs!r}")
    if len(user_seqs) == 0:
        raise _bad("user_seqs is empty: at least one user is needed")
    return len(user_seqs)


def user_id(value: Any, timestamps_: Any | None) -> str | None:
    """A caller's user id (int or str) -> the string sent; the cache needs the events' real timestamps."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str, np.integer)):
        raise _bad(f"user_id must be an int or a str, got {type(value).__name__}")
    text = str(value)
    if not 0 < len(text.encode()) <= protocol.MAX_USER_ID_BYTES:
        raise _bad(f"user_id must be 1 to {protocol.MAX_USER_ID_BYTES} bytes, got {len(text.encode())}")
    if timestamps_ is None:
        raise _bad("user_id needs the events' timestamps: without them every call stamps each event with the "
                   "current time, so no history would ever extend the one the server cached")
    return text


def urls(value: Any) -> tuple[str, ...]:
    """One 'host:port' or several (replicas) -> a tuple of at least one."""
    found = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not found or any(not isinstance(u, str) or not u.strip() for u in found):
        raise _bad(f"url must be 'host:port' or a list of them, got {value!r}")
    if len(set(found)) != len(found):
        raise _bad(f"url lists a replica twice: {list(found)}")
    return found


def settings(timeout_s: Any, retries: Any, concurrency: Any) -> None:
    """The client's constructor arguments."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < np.inf:
        raise _bad(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise _bad(f"retries must be an integer >= 0, got {retries!r}")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise _bad(f"concurrency must be an integer >= 1, got {concurrency!r}")
