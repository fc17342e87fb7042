"""Top-K retrieval: brute force against a naive reference, chunking, FAISS recall, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from genrec.training.retrieval import (
    FaissConfig,
    build_faiss_index,
    faiss_top_k,
    load_index,
    save_index,
    top_k,
)


def naive_top_k(user: Tensor, table: Tensor, k: int, exclude: Tensor | None) -> tuple[Tensor, Tensor]:
    """Score everything, drop padding and excluded, order by (score desc, id asc) with Python's sort."""
    scores = (user @ table.T).tolist()
    ids, values = [], []
    for row, row_scores in enumerate(scores):
        banned = {0} | (set(exclude[row].tolist()) if exclude is not None else set())
        ranked = sorted((-s, i) for i, s in enumerate(row_scores) if i not in banned)[:k]
        ids.append([i for _, i in ranked])
        values.append([-s for s, _ in ranked])
    return torch.tensor(ids), torch.tensor(values)


def random_case(num_items: int, batch: int, dim: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    table = F.normalize(torch.randn(num_items + 1, dim, generator=g), dim=-1)
    table[0] = 0
    user = torch.randn(batch, dim, generator=g)
    exclude = torch.randint(0, num_items + 1, (batch, 30), generator=g)
    exclude[:, 20:] = 0  # right padding
    return user, table, exclude


@pytest.mark.parametrize("use_exclude", [False, True])
def test_brute_force_matches_naive_reference(use_exclude: bool) -> None:
    user, table, exclude = random_case(num_items=500, batch=4, dim=16, seed=0)
    ex = exclude if use_exclude else None
    ids, scores = top_k(user, table, 25, ex)
    ref_ids, ref_scores = naive_top_k(user, table, 25, ex)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores)
    assert not (ids == 0).any()
    if use_exclude:
        for row in range(ids.shape[0]):
            assert not set(ids[row].tolist()) & set(exclude[row].tolist())


def test_ties_come_out_by_ascending_id() -> None:
    # Items 1..40 take 4 distinct vectors, so every score is shared by ten items.
    base = torch.eye(4)
    table = torch.cat([torch.zeros(1, 4), base.repeat_interleave(10, dim=0)[torch.randperm(40)]])
    user = torch.tensor([[1.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 1.0]])
    exclude = torch.tensor([[3, 7, 0], [0, 0, 0]])
    for chunk_size in (4, 7, 1000):  # chunk boundaries cut through tied groups
        ids, scores = top_k(user, table, 23, exclude, chunk_size=chunk_size)
        ref_ids, ref_scores = naive_top_k(user, table, 23, exclude)
        assert torch.equal(ids, ref_ids), chunk_size
        torch.testing.assert_close(scores, ref_scores)


@pytest.mark.parametrize("chunk_size", [1, 3, 64, 1000, 5000])
def test_chunking_gives_identical_results(chunk_size: int) -> None:
    user, table, exclude = random_case(num_items=2000, batch=3, dim=8, seed=1)
    ids, scores = top_k(user, table, 50, exclude, chunk_size=10**9)
    chunk_ids, chunk_scores = top_k(user, table, 50, exclude, chunk_size=chunk_size)
    assert torch.equal(ids, chunk_ids)
    # Scores agree to rounding only: BLAS may sum a 1-row product in another order than a 2001-row one.
    torch.testing.assert_close(scores, chunk_scores, rtol=1e-6, atol=1e-6)


def test_rows_with_fewer_eligible_items_than_k_are_padded_alone() -> None:
    user, table, _ = random_case(num_items=10, batch=2, dim=4, seed=2)
    ids, scores = top_k(user, table, 11)  # a catalogue of 10: one pad per row
    assert (ids[:, :10] > 0).all() and (ids[:, 10] == -1).all() and torch.isneginf(scores[:, 10]).all()
    exclude = torch.tensor([[1, 2, 2, 0], [0, 0, 0, 0]])  # row 0 has 8 eligible items
    ids, scores = top_k(user, table, 9, exclude)
    assert (ids[0, 8] == -1) and torch.isneginf(scores[0, 8]) and set(ids[0, :8].tolist()) == set(range(3, 11))
    # the other row is what it would be alone (scores to rounding: BLAS sums a 1-row product in another order)
    alone_ids, alone_scores = top_k(user[1:], table, 9)
    assert torch.equal(ids[1:], alone_ids)
    torch.testing.assert_close(scores[1:], alone_scores, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="k=0 must be >= 1"):
        top_k(user, table, 0)
    with pytest.raises(ValueError, match="outside 0..10"):
        top_k(user, table, 3, torch.tensor([[11], [0]]))


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact, strict=True)]))


@pytest.mark.parametrize(
    "config",
    [
        FaissConfig(kind="hnsw", hnsw_m=16, ef_construction=40, ef_search=128),
        FaissConfig(kind="ivf", nlist=64, nprobe=16),
    ],
    ids=["hnsw", "ivf"],
)
def test_faiss_recall_and_exclusion(config: FaissConfig, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    num_items, dim, batch = 5000, 32, 50
    centres = rng.standard_normal((50, dim))
    table = centres[rng.integers(0, 50, num_items + 1)] + 0.7 * rng.standard_normal((num_items + 1, dim))
    table = (table / np.linalg.norm(table, axis=1, keepdims=True)).astype(np.float32)
    table[0] = 0
    user = table[rng.integers(1, num_items + 1, batch)] + 0.3 * rng.standard_normal((batch, dim)).astype(
        np.float32
    )
    exact_ids, _ = top_k(torch.from_numpy(user), torch.from_numpy(table), 60)
    # Exclude a user's 5 best items and some random ones, so filtering is really exercised.
    exclude = np.concatenate([exact_ids[:, :5].numpy(), rng.integers(1, num_items + 1, (batch, 10))], axis=1)
    exclude[:, -3:] = 0
    ref_ids, ref_scores = top_k(
        torch.from_numpy(user), torch.from_numpy(table), 10, torch.from_numpy(exclude)
    )

    index = build_faiss_index(table, config)
    assert index.ntotal == num_items
    save_index(index, tmp_path / "items.faiss")
    index = load_index(tmp_path / "items.faiss")
    ids, scores = faiss_top_k(index, user, 10, exclude)

    assert ids.shape == scores.shape == (batch, 10)
    assert (ids >= 1).all()
    for row in range(batch):
        assert not set(ids[row]) & set(exclude[row])
        assert len(set(ids[row])) == 10
    assert recall(ids, ref_ids.numpy()) >= 0.9
    assert (np.diff(scores, axis=1) <= 0).all()
    # Returned scores are exact inner products (flat storage).
    np.testing.assert_allclose(scores, np.take_along_axis(user @ table.T, ids, axis=1), rtol=1e-5, atol=1e-5)
    assert ref_scores.shape == (batch, 10)


def test_faiss_pads_when_too_few_items() -> None:
    table = np.eye(6, 4, k=-1, dtype=np.float32)  # row 0 zero, items 1..4 unit vectors, item 5 zero
    index = build_faiss_index(table, FaissConfig(kind="hnsw"))
    ids, scores = faiss_top_k(index, np.ones((1, 4), np.float32), 4, np.array([[2, 3, 0]]))
    assert ids.tolist() == [[1, 4, 5, -1]]
    assert np.isneginf(scores[0, 3])
