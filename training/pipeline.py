"""The two-stage recommendation pipeline in-process: retrieve, re-rank with the cached-K/V scorer, top-k.

The served `recommend` computes exactly this (contract 4); the serving benchmarks compare against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from genrec.training.batch import SequenceBatch
from genrec.training.hstu import HSTU, KVCache
from genrec.training.retrieval import top_k


def window_start(num_events: int, max_len: int, block: int) -> int:
    """The first of a history's ``num_events`` (known) events that the served model reads.

    A history longer than ``max_len`` loses its oldest events in whole blocks of ``block``: the window
    starts at a multiple of ``block`` and holds between ``max_len - block + 1`` and ``max_len`` events.
    A returning user's cached K/V therefore stays valid for ``block`` appended events before the window
    moves and the user is recomputed once; ``block=1`` keeps exactly the latest ``max_len`` events.
    """
    if num_events <= max_len:
        return 0
    return -(-(num_events - max_len) // block) * block


def rerank(model: HSTU, cache: KVCache, user: Tensor, candidates: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Candidates (B, R) dense ids (0 = none: retrieval came up short) -> the k best by the served score and
    their scores, ties in the candidates' order; a row with fewer than k candidates ends in 0 / -inf."""
    scores = model.score_candidates(cache, user, candidates.clamp(min=0))[..., 0]  # (B, R)
    scores = scores.masked_fill(candidates < 1, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return candidates.clamp(min=0).gather(1, order), scores.gather(1, order)


@torch.inference_mode()
def recommend(
    model: HSTU, batch: SequenceBatch, k: int, retrieve_k: int = 100, seen: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(B, T) histories (dense ids, the served window: see `window_start`) -> the k best items (B, k) and
    their scores (B, k).

    seen: (B, S) dense ids never to recommend (0 = padding), e.g. the whole history before truncation.
    """
    cache, user = model.prefill(batch)
    candidates, _ = top_k(user, model.item_table(), retrieve_k, seen)  # -1 past a heavy user's eligible items
    return rerank(model, cache, user, candidates, k)
