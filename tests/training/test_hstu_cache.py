"""HSTU's K/V cache: contracts 1 (cache exactness) and 2 (incremental prefill) of DESIGN.md, and exact batching.

Tolerance: 1e-5 max abs diff in fp32, the contract's. The compared paths compute the same sums over key axes
of different widths and in a different order (the candidate's own term is added apart from the history's), so
they agree only to rounding: about 2e-6 on logits of magnitude ~20 (the retrieval logit is divided by the
temperature 0.05). Weights are re-drawn with std 0.5, the relative-bias tables included (zero at init): at the
init scale, or at std 0.2, the history moves a candidate's score by only ~1e-4, too little for a 1e-5 check to
notice a wrong cache; at 0.5 it moves it by 1e-2..1. Each test also shows that what it compares does move when
the cache is perturbed, so the checks can fail.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import Tensor

from genrec.training.batch import SequenceBatch
from genrec.training.embeddings import ItemFeatures
from genrec.training.hstu import HSTU, HSTUConfig, KVCache
from genrec.training.popularity import PopularityConfig, popularity_table

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
NUM_ITEMS = 60
NUM_ACTIONS = 4
WEIGHT_STD = 0.5


@dataclass(frozen=True)
class Case:
    seed: int
    num_layers: int
    num_heads: int
    d_model: int
    d_qk: int
    d_v: int
    lengths: tuple[int, ...]  # history length per user, mixed within the batch
    features: bool = False  # item side features (genres, years) and the scorer's popularity features on


CASES = [
    Case(seed=0, num_layers=1, num_heads=1, d_model=16, d_qk=8, d_v=8, lengths=(1, 7, 24)),
    Case(seed=1, num_layers=2, num_heads=2, d_model=16, d_qk=8, d_v=4, lengths=(1, 5, 12, 20)),
    Case(seed=2, num_layers=3, num_heads=4, d_model=12, d_qk=3, d_v=5, lengths=(2, 1, 17, 9, 1), features=True),
]
IDS = [f"seed{c.seed}-L{c.num_layers}-H{c.num_heads}-qk{c.d_qk}-v{c.d_v}" for c in CASES]


def make_model(case: Case, score_chunk: int = 7) -> HSTU:
    """An eval-mode HSTU (max_len 30) with every parameter re-drawn ~ N(0, WEIGHT_STD)."""
    torch.manual_seed(case.seed)
    rng = np.random.default_rng(case.seed)
    log_times = 1_600_000_000 + rng.integers(0, 3 * 10**7, 2_000)  # spans the histories' times
    table = popularity_table(log_times, rng.integers(1, NUM_ITEMS + 1, 2_000), NUM_ITEMS, PopularityConfig())
    config = HSTUConfig(
        num_items=NUM_ITEMS, num_actions=NUM_ACTIONS, num_genres=3 if case.features else 0,
        num_years=4 if case.features else 0, d_model=case.d_model, num_layers=case.num_layers,
        num_heads=case.num_heads, d_qk=case.d_qk, d_v=case.d_v, max_len=30, dropout=0.2,
        num_time_buckets=16, score_chunk=score_chunk,
        popularity_windows=PopularityConfig().windows if case.features else (),
        popularity_buckets=table.num_buckets if case.features else 0,
    )
    model = HSTU(config)
    if model.popularity is not None:
        model.popularity.set_table(table)
    if case.features:
        genres = (torch.rand(NUM_ITEMS + 1, 3) < 0.4).float().numpy()
        genres[0] = 0
        years = torch.randint(0, 5, (NUM_ITEMS + 1,)).numpy()
        years[0] = 0
        model.items.set_features(ItemFeatures(genres, years))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, WEIGHT_STD)
    return model.eval()


def random_histories(lengths: tuple[int, ...], seed: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Items (repeats allowed), non-decreasing timestamps (ties and gaps from 0 s to ~11 days), actions."""
    g = torch.Generator().manual_seed(1000 + seed)
    items, times, actions = [], [], []
    for n in lengths:
        items.append(torch.randint(1, NUM_ITEMS + 1, (n,), generator=g).tolist())
        gaps = torch.randint(0, 10**6, (n,), generator=g) * (torch.rand(n, generator=g) > 0.2)
        times.append((1_600_000_000 + gaps.cumsum(0)).tolist())
        actions.append(torch.randint(0, NUM_ACTIONS, (n,), generator=g).tolist())
    return items, times, actions


def batch_of(case: Case) -> SequenceBatch:
    return SequenceBatch.from_lists(*random_histories(case.lengths, case.seed))


def candidates_for(batch_size: int, count: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(2000 + seed)
    return torch.randint(1, NUM_ITEMS + 1, (batch_size, count), generator=g)


def max_diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def valid_kv(cache: KVCache, row: int) -> tuple[Tensor, Tensor, Tensor]:
    n = int(cache.lengths[row])
    return cache.keys[row, :, :n], cache.values[row, :, :n], cache.timestamps[row, :n]


# ---- contract 1: cache exactness ------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
@torch.no_grad()
def test_scoring_from_cache_equals_full_forward(case: Case) -> None:
    model = make_model(case, score_chunk=7)
    batch = batch_of(case)
    candidates = candidates_for(batch.batch_size, 50, case.seed)  # 50 candidates = 8 chunks of <= 7
    candidates[:, 0] = batch.items[:, 0]  # a candidate the user has already seen
    candidates[:, 1] = candidates[:, 2]  # the same candidate twice

    cache, user = model.prefill(batch)
    cached = model.score_candidates(cache, user, candidates)
    reference = model.forward_with_candidates(batch, candidates)

    assert cached.shape == (batch.batch_size, 50, model.config.num_tasks)
    assert torch.isfinite(cached).all()
    assert max_diff(cached, reference) <= TOL
    assert reference.std() > 1.0  # the weights are far from trivial
    assert max_diff(cached[:, 1], cached[:, 2]) <= TOL


@pytest.mark.parametrize("case", CASES, ids=IDS)
@torch.no_grad()
def test_scores_depend_on_valid_cache_entries_only(case: Case) -> None:
    """The exactness check can fail: noise on the valid keys or values of any one layer moves every user's
    scores by far more than the tolerance; noise on the padding beyond a row's length moves nothing (bit for bit)."""
    model = make_model(case)
    batch = batch_of(case)
    candidates = candidates_for(batch.batch_size, 10, case.seed)
    cache, user = model.prefill(batch)
    base = model.score_candidates(cache, user, candidates)
    valid = batch.valid_mask()
    g = torch.Generator().manual_seed(case.seed)
    for layer in range(case.num_layers):
        for field in ("keys", "values"):
            tensor = getattr(cache, field).clone()
            tensor[:, layer][valid] += torch.randn(tensor[:, layer][valid].shape, generator=g)  # (B, L) of a layer
            perturbed = KVCache(**{**vars(cache), field: tensor})
            moved = (model.score_candidates(perturbed, user, candidates) - base).abs().amax(dim=(1, 2))
            assert (moved > 100 * TOL).all(), (layer, field, moved)

    padded = ~batch.valid_mask()
    if padded.any():
        keys, values = cache.keys.clone(), cache.values.clone()
        keys.transpose(1, 2)[padded] = 1e3  # (B, L) of every layer
        values.transpose(1, 2)[padded] = -1e3
        noisy = KVCache(keys, values, cache.timestamps, cache.lengths)
        assert torch.equal(model.score_candidates(noisy, user, candidates), base)


@torch.no_grad()
def test_request_time_defaults_to_the_last_event() -> None:
    case = CASES[1]
    model = make_model(case)
    batch = batch_of(case)
    candidates = candidates_for(batch.batch_size, 12, case.seed)
    cache, user = model.prefill(batch)
    default = model.score_candidates(cache, user, candidates)
    explicit = model.score_candidates(cache, user, candidates, request_time=batch.last_timestamps())
    assert torch.equal(default, explicit)
    # the time bias is live, so the default is a real choice: a request a week later scores differently
    later = model.score_candidates(cache, user, candidates, request_time=batch.last_timestamps() + 7 * 86400)
    assert max_diff(later, default) > 1e-3


@pytest.mark.parametrize("case", CASES, ids=IDS)
@torch.no_grad()
def test_truncated_training_cache_equals_prefix_forward(case: Case) -> None:
    """Training scores cut points from the full forward's cache seen at a shorter length (`with_lengths`):
    that must be the same as scoring after the prefix alone."""
    model = make_model(case)
    batch = batch_of(case)
    candidates = candidates_for(batch.batch_size, 9, case.seed)
    users, cache = model.encode_with_cache(batch)
    cuts = (batch.lengths + 1) // 2  # in [1, length]
    rows = torch.arange(batch.batch_size)
    truncated = model.score_candidates(cache.with_lengths(cuts), users[rows, cuts - 1], candidates)
    prefix = SequenceBatch.from_lists(
        *([r[: int(c)] for r, c in zip(rows_, cuts, strict=True)] for rows_ in random_histories(case.lengths, case.seed))
    )
    assert max_diff(truncated, model.forward_with_candidates(prefix, candidates)) <= TOL


# ---- contract 2: incremental prefill ---------------------------------------------------------------------


def split_batch(lengths: tuple[int, ...], seed: int, cuts: list[list[int]]) -> list[SequenceBatch]:
    """The histories cut at per-row points `cuts[row]` into consecutive pieces, one SequenceBatch per piece."""
    items, times, actions = random_histories(lengths, seed)
    pieces = []
    for k in range(len(cuts[0]) + 1):
        def part(rows: list[list[int]], k: int = k) -> list[list[int]]:
            bounds = [[0, *c, len(r)] for r, c in zip(rows, cuts, strict=True)]
            return [r[b[k] : b[k + 1]] for r, b in zip(rows, bounds, strict=True)]

        pieces.append(SequenceBatch.from_lists(part(items), part(times), part(actions)))
    return pieces


INCREMENTAL = [
    # lengths (every piece needs >= 1 event), per-row cut points: the history arrives in len(cuts[row]) + 1 pieces
    (CASES[0], (2, 7, 30), [[1], [6], [11]]),
    (CASES[1], (2, 5, 12, 20), [[1], [2], [11], [1]]),
    (CASES[2], (3, 17, 9, 3, 25), [[1, 2], [5, 6], [1, 8], [1, 2], [10, 24]]),
]


def prefill_in_pieces(model: HSTU, pieces: list[SequenceBatch], cache: KVCache | None = None) -> tuple[KVCache, Tensor]:
    for piece in pieces:
        cache, user = model.prefill(piece, cache)
    return cache, user  # type: ignore[return-value]


@pytest.mark.parametrize("case, lengths, cuts", INCREMENTAL, ids=IDS)
@torch.no_grad()
def test_incremental_prefill_equals_one_prefill(case: Case, lengths: tuple[int, ...], cuts: list[list[int]]) -> None:
    model = make_model(case)
    full_batch = SequenceBatch.from_lists(*random_histories(lengths, case.seed))
    full_cache, full_user = model.prefill(full_batch)

    pieces = split_batch(lengths, case.seed, cuts)
    cache, user = prefill_in_pieces(model, pieces)

    assert torch.equal(cache.lengths, full_cache.lengths)
    assert max_diff(user, full_user) <= TOL
    for row in range(len(lengths)):
        keys, values, stamps = valid_kv(cache, row)
        full_keys, full_values, full_stamps = valid_kv(full_cache, row)
        assert max_diff(keys, full_keys) <= TOL and max_diff(values, full_values) <= TOL
        assert torch.equal(stamps, full_stamps)

    # the incrementally built cache serves candidates exactly as well
    candidates = candidates_for(len(lengths), 20, case.seed)
    reference = model.forward_with_candidates(full_batch, candidates)
    assert max_diff(model.score_candidates(cache, user, candidates), reference) <= TOL

    # and the check can fail: the later pieces do read the earlier pieces' cache
    # (random noise: a constant shift of a value vector would vanish in the attention LayerNorm)
    first, _ = model.prefill(pieces[0])
    g = torch.Generator().manual_seed(case.seed)
    valid = pieces[0].valid_mask()
    for field in ("keys", "values"):
        tensor = getattr(first, field).clone()
        tensor.transpose(1, 2)[valid] += torch.randn(tensor.transpose(1, 2)[valid].shape, generator=g)  # every layer
        _, moved = prefill_in_pieces(model, pieces[1:], KVCache(**{**vars(first), field: tensor}))
        # >= 7e-4 even for a 2-event, 1-layer history: well above the tolerance
        assert ((moved - full_user).abs().amax(dim=1) > 10 * TOL).all(), field


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_appending_in_place_never_changes_a_cache_already_handed_out(mode: type) -> None:
    """A returning user's events go into the cache's spare room; a branch off an older cache gets a copy."""
    case = CASES[2]
    lengths, cuts = (3, 17, 9, 3, 25), [[1, 2], [5, 6], [1, 8], [1, 2], [10, 24]]
    with mode():
        model = make_model(case)
        pieces = split_batch(lengths, case.seed, cuts)
        first, _ = model.prefill(pieces[0])
        second, _ = model.prefill(pieces[1], first)  # copied into an arena with spare room
        assert second.arena is not None and second.arena.capacity > int(second.lengths.max())
        third, third_user = model.prefill(pieces[2], second)
        assert third.keys.data_ptr() == second.keys.data_ptr(), "the third piece should be appended in place"

        second_keys, second_values = second.keys.clone(), second.values.clone()
        branch, _ = model.prefill(pieces[2], second.with_lengths(first.lengths))  # other events after piece 1
        assert branch.keys.data_ptr() != second.keys.data_ptr(), "a branch must not write into a used arena"
        assert torch.equal(second.keys, second_keys) and torch.equal(second.values, second_values)
        again, again_user = model.prefill(pieces[2], second)  # `second` is still exactly reusable
        assert max_diff(again_user, third_user) <= TOL
        assert max_diff(model.prefill(pieces[2], third)[1], model.prefill(pieces[2], again)[1]) <= TOL


# ---- candidate independence and exact batching -------------------------------------------------------------


@torch.no_grad()
def test_candidate_score_ignores_the_other_candidates() -> None:
    case = CASES[1]
    model = make_model(case, score_chunk=7)
    batch = batch_of(case)
    cache, user = model.prefill(batch)
    candidates = candidates_for(batch.batch_size, 50, case.seed)
    base = model.score_candidates(cache, user, candidates)

    g = torch.Generator().manual_seed(7)
    perm = torch.randperm(50, generator=g)
    assert max_diff(model.score_candidates(cache, user, candidates[:, perm]), base[:, perm]) <= TOL

    kept = torch.tensor([3, 17, 18, 40])  # removed: the rest, so chunk boundaries move
    assert max_diff(model.score_candidates(cache, user, candidates[:, kept]), base[:, kept]) <= TOL

    extra = candidates_for(batch.batch_size, 23, seed=99)
    grown = model.score_candidates(cache, user, torch.cat([extra[:, :11], candidates, extra[:, 11:]], dim=1))
    assert max_diff(grown[:, 11:61], base) <= TOL

    singles = torch.cat([model.score_candidates(cache, user, candidates[:, i : i + 1]) for i in (0, 25, 49)], 1)
    assert max_diff(singles, base[:, [0, 25, 49]]) <= TOL

    # the reference path has the same property: one candidate never attends to another
    reference = model.forward_with_candidates(batch, candidates[:, perm][:, :9])
    assert max_diff(reference, base[:, perm][:, :9]) <= TOL


@pytest.mark.parametrize("case", CASES, ids=IDS)
@torch.no_grad()
def test_padding_the_batch_does_not_change_a_user(case: Case) -> None:
    """Adding a longer user widens the padding of everyone else; their outputs must not move."""
    model = make_model(case)
    items, times, actions = random_histories(case.lengths, case.seed)
    long_items, long_times, long_actions = random_histories((max(case.lengths) + 6,), seed=case.seed + 50)
    small = SequenceBatch.from_lists(items, times, actions)
    big = SequenceBatch.from_lists(items + long_items, times + long_times, actions + long_actions)
    assert big.max_len > small.max_len
    b = small.batch_size
    candidates = candidates_for(b, 15, case.seed)
    big_candidates = torch.cat([candidates, candidates_for(1, 15, seed=77)])

    small_cache, small_user = model.prefill(small)
    big_cache, big_user = model.prefill(big)
    assert max_diff(big_user[:b], small_user) <= TOL
    for row in range(b):
        for a, c in zip(valid_kv(big_cache, row), valid_kv(small_cache, row), strict=True):
            assert max_diff(a.float(), c.float()) <= TOL
    assert max_diff(model.score_candidates(big_cache, big_user, big_candidates)[:b],
                    model.score_candidates(small_cache, small_user, candidates)) <= TOL
    assert max_diff(model.forward_with_candidates(big, big_candidates)[:b],
                    model.forward_with_candidates(small, candidates)) <= TOL
    mask = small.valid_mask()
    assert max_diff(model.encode(big)[:b, : small.max_len][mask], model.encode(small)[mask]) <= TOL

    # each user alone, in a batch of one, gets the same too
    for row in range(b):
        alone = SequenceBatch.from_lists([items[row]], [times[row]], [actions[row]])
        assert max_diff(model.prefill(alone)[1][0], small_user[row]) <= TOL
