"""The two-stage recommendation pipeline in-process: retrieve, re-rank with the cached-K/V scorer, top-k.

The served `recommend` ensemble computes exactly this (contract 4); the serving benchmarks compare against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from genrec.training.batch import SequenceBatch
from genrec.training.hstu import HSTU
from genrec.training.retrieval import top_k


@torch.inference_mode()
def recommend(
    model: HSTU, batch: SequenceBatch, k: int, retrieve_k: int = 100, seen: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(B, T) histories (dense ids, at most max_len) -> the k best items (B, k) and their scores (B, k).

    seen: (B, S) dense ids never to recommend (0 = padding), e.g. the whole history before truncation.
    """
    cache, user = model.prefill(batch)
    candidates, _ = top_k(user, model.item_table(), retrieve_k, seen)  # -1 past a heavy user's eligible items
    scores = model.score_candidates(cache, user, candidates.clamp(min=0))[..., 0]  # (B, R)
    scores = scores.masked_fill(candidates < 1, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]  # ties keep retrieval order
    return candidates.gather(1, order), scores.gather(1, order)
