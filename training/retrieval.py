"""Top-K retrieval over the item table: exact brute force (torch) and approximate (FAISS).

Both take the user embedding (B, D) from ``HSTU.prefill`` and the table (N+1, D) from ``HSTU.item_table``,
where row 0 is padding and is never returned. Scores are inner products (the table is L2-normalised, so
this is cosine similarity up to the user's norm). Items the user has already seen are passed as
``exclude`` (B, T) dense ids, right-padded with 0, i.e. the history batch's ``items`` as is.

Results are ordered by score, descending; equal scores are ordered by item id, ascending, in both paths,
so a served answer is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # faiss loads only where an index is built or read: served processes without one skip it
    import faiss

DEFAULT_CHUNK = 65536  # catalogue rows scored at a time: B=64 x 65536 x 4 bytes = 16 MiB of scores


# ---- exact: brute-force inner product ------------------------------------------------------------------


def _check_exclude(exclude: Tensor, num_items: int) -> None:
    if exclude.dim() != 2:
        raise ValueError(f"exclude must be (B, T) dense item ids, got shape {tuple(exclude.shape)}")
    if exclude.numel() and (int(exclude.min()) < 0 or int(exclude.max()) > num_items):
        raise ValueError(
            f"exclude holds ids outside 0..{num_items}: min {int(exclude.min())}, max {int(exclude.max())}"
        )


def _by_score_then_id(scores: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by score descending, ties by id ascending (two stable sorts = lexicographic order)."""
    order = ids.argsort(dim=1, stable=True)
    scores, ids = scores.gather(1, order), ids.gather(1, order)
    order = scores.argsort(dim=1, descending=True, stable=True)
    return scores.gather(1, order), ids.gather(1, order)


def _chunk_top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(B, n) scores -> the k best (values, local indices), ties at the k-th value resolved by lower index.

    ``torch.topk`` is fast but picks arbitrarily among values tied with the k-th. Asking it for k+1 shows
    whether such a tie crosses the cut (the (k+1)-th value equals the k-th); only then (rare with float
    scores; always when excluded -inf items reach the cut of a tiny chunk) does the chunk fall back to a
    stable full sort, which keeps lower indices first.
    """
    n = scores.shape[1]
    if k >= n:
        values, index = scores.sort(dim=1, descending=True, stable=True)
        return values[:, :k], index[:, :k]
    values, index = scores.topk(k + 1, dim=1)
    if bool((values[:, k - 1] == values[:, k]).any()):
        values, index = scores.sort(dim=1, descending=True, stable=True)
    return values[:, :k], index[:, :k]


@torch.no_grad()
def top_k(
    user: Tensor, table: Tensor, k: int, exclude: Tensor | None = None, chunk_size: int = DEFAULT_CHUNK
) -> tuple[Tensor, Tensor]:
    """Exact top-k items by inner product: user (B, D), table (N+1, D) -> ids (B, k) int64, scores (B, k).

    exclude: (B, T) dense ids to drop (0 = padding, ignored). Never returns id 0. The catalogue is scored
    ``chunk_size`` rows at a time and merged into a running top-k, so memory is O(B * (chunk_size + k))
    whatever N is. Ties: equal scores come out in ascending id order (see ``_chunk_top_k``). A row with fewer
    than k eligible items (N minus its distinct excluded ids: a user who has seen nearly everything) is
    padded with id -1 and score -inf, as ``faiss_top_k`` pads, so it never fails the other rows of its batch.
    """
    num_items = table.shape[0] - 1
    b = user.shape[0]
    if user.dim() != 2 or table.dim() != 2 or user.shape[1] != table.shape[1]:
        raise ValueError(
            f"user (B, D) and table (N+1, D) disagree: {tuple(user.shape)} vs {tuple(table.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if exclude is not None:
        exclude = exclude.to(device=user.device, dtype=torch.long)
        _check_exclude(exclude, num_items)
        if exclude.shape[0] != b:
            raise ValueError(f"exclude has {exclude.shape[0]} rows for {b} users")
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")

    best_scores = user.new_full((b, 0), float("-inf"))
    best_ids = torch.zeros((b, 0), dtype=torch.long, device=user.device)
    for start in range(0, num_items + 1, chunk_size):
        stop = min(start + chunk_size, num_items + 1)
        scores = user @ table[start:stop].T  # (B, n)
        if start == 0:
            scores[:, 0] = float("-inf")  # padding
        if exclude is not None:
            rows, cols = ((exclude >= max(start, 1)) & (exclude < stop)).nonzero(as_tuple=True)
            scores[rows, exclude[rows, cols] - start] = float("-inf")
        values, index = _chunk_top_k(scores, min(k, stop - start))
        best_scores, best_ids = _by_score_then_id(
            torch.cat([best_scores, values], dim=1), torch.cat([best_ids, index + start], dim=1)
        )
        best_scores, best_ids = best_scores[:, :k], best_ids[:, :k]
    pad = k - best_ids.shape[1]  # a catalogue smaller than k
    best_scores = F.pad(best_scores, (0, pad), value=float("-inf"))
    best_ids = F.pad(best_ids, (0, pad), value=-1).masked_fill(torch.isneginf(best_scores), -1)
    return best_ids, best_scores


# ---- approximate: FAISS ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaissConfig:
    """An approximate inner-product index. HNSW: graph, no training; IVF: k-means lists, flat storage."""

    kind: Literal["ivf", "hnsw"] = "hnsw"
    nlist: int = 1024  # IVF lists; capped at N // 39, faiss's minimum of training points per list
    nprobe: int = 32  # IVF lists visited per query
    hnsw_m: int = 32  # HNSW neighbours per node
    ef_search: int = 128  # HNSW search beam (faiss uses max(ef_search, k))
    ef_construction: int = 80  # HNSW build beam


def build_faiss_index(table: np.ndarray, config: FaissConfig = FaissConfig()) -> faiss.Index:
    """(N+1, D) float32 item table -> an inner-product index over rows 1..N, answering with dense ids.

    Row 0 (padding) is left out, so the index can never return it; search parameters (nprobe, ef_search)
    are stored in the index and survive ``save_index``/``load_index``.
    """
    import faiss

    vectors = np.ascontiguousarray(np.asarray(table, dtype=np.float32)[1:])
    n, d = vectors.shape
    if n < 1:
        raise ValueError(f"the item table has no items besides padding: shape {table.shape}")
    ids = np.arange(1, n + 1, dtype=np.int64)
    # index_factory indexes own their sub-indexes, so nothing here must outlive this function.
    if config.kind == "hnsw":
        index: Any = faiss.index_factory(d, f"IDMap,HNSW{config.hnsw_m},Flat", faiss.METRIC_INNER_PRODUCT)
        graph: Any = faiss.downcast_index(index.index)
        hnsw = graph.hnsw
        hnsw.efConstruction = config.ef_construction
        hnsw.efSearch = config.ef_search
        index.add_with_ids(vectors, ids)
        return index
    if config.kind == "ivf":
        nlist = max(1, min(config.nlist, n // 39))
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.add_with_ids(vectors, ids)
        faiss.extract_index_ivf(index).nprobe = min(config.nprobe, nlist)
        return index
    raise ValueError(f"unknown FAISS index kind {config.kind!r}; expected 'hnsw' or 'ivf'")


def save_index(index: faiss.Index, path: str | Path) -> None:
    import faiss

    faiss.write_index(index, str(path))


def load_index(path: str | Path) -> faiss.Index:
    import faiss

    return faiss.read_index(str(path))


def faiss_top_k(
    index: faiss.Index, user: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-k: user (B, D) float32 -> ids (B, k) int64, scores (B, k) float32.

    exclude: (B, T) dense ids to drop (0 = padding, ignored). The index is asked for k + (the most excluded
    ids in any row) neighbours, the excluded ones are filtered out, and the first k remaining are returned,
    ordered by score then id like ``top_k``. Where fewer than k remain (an approximate index may return
    fewer neighbours than asked, or a catalogue smaller than k + history), the row is padded with id -1 and
    score -inf.
    """
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    user = np.ascontiguousarray(np.asarray(user, dtype=np.float32))
    b = user.shape[0]
    extra = 0
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=np.int64)
        if exclude.ndim != 2 or exclude.shape[0] != b:
            raise ValueError(f"exclude must be ({b}, T) dense ids, got shape {exclude.shape}")
        extra = int((exclude != 0).sum(axis=1).max(initial=0))
    fetch = max(1, min(k + extra, int(index.ntotal)))
    scores, ids = index.search(user, fetch)  # (B, fetch), -1 where the index found fewer
    keep = ids >= 1
    if exclude is not None and extra:
        # Row-tagged keys make one vectorised membership test for the whole batch.
        span = int(max(ids.max(initial=0), exclude.max(initial=0))) + 1
        rows = np.arange(b, dtype=np.int64)[:, None]
        keep &= ~np.isin(rows * span + ids, (rows * span + exclude)[exclude != 0])
    scores = np.where(keep, scores, -np.inf).astype(np.float32)
    ids = np.where(keep, ids, -1)
    # Kept neighbours first, by score descending then id ascending; dropped ones (-inf) last.
    order = np.lexsort((np.where(keep, ids, np.iinfo(np.int64).max), -scores), axis=1)
    ids = np.take_along_axis(ids, order, axis=1)[:, :k]
    scores = np.take_along_axis(scores, order, axis=1)[:, :k]
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return ids, scores
