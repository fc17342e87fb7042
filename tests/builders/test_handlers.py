"""The served models' logic without a server: validation, id mapping, truncation, batching, top-n."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from genrec.builders import handlers as h
from genrec.builders.build import BUILD_CONFIG_FILE, BuildConfig, build_repository, model_specs, next_version
from genrec.builders.model_config import read_config, to_model_config
from genrec.builders.runtimes import TorchRuntime
from genrec.client import protocol
from genrec.training.batch import length_groups
from genrec.training.checkpoint import load_checkpoint, load_meta
from genrec.training.hstu import HSTU


def history(items, timestamps=None, actions=None) -> h.Request:
    items = np.asarray(items, np.int64)[None]
    timestamps = np.arange(items.shape[1], dtype=np.int64)[None] if timestamps is None else np.asarray(timestamps)[None]
    actions = np.zeros_like(items) if actions is None else np.asarray(actions, np.int64)[None]
    return {protocol.HISTORY_ITEM_IDS: items, protocol.HISTORY_TIMESTAMPS: timestamps, protocol.HISTORY_ACTIONS: actions}


@pytest.fixture(scope="module")
def catalogue(tiny_checkpoint: Path) -> h.Catalogue:
    return h.Catalogue.from_meta(load_meta(tiny_checkpoint))


def test_unknown_ids_are_dropped_and_counted(catalogue: h.Catalogue) -> None:
    raw = catalogue.vocab.raw_ids
    parsed = h.parse_history(history([raw[3], -5, raw[7], 10**12]), catalogue, max_len=50)
    assert parsed.items.tolist() == [4, 8]
    assert parsed.num_unknown == 2 and parsed.num_truncated == 0


def test_long_history_keeps_the_most_recent_events(catalogue: h.Catalogue) -> None:
    raw = catalogue.vocab.raw_ids[:10]
    parsed = h.parse_history(history(raw, timestamps=np.arange(10) * 7), catalogue, max_len=4)
    assert parsed.items.tolist() == [7, 8, 9, 10]
    assert parsed.timestamps.tolist() == [42, 49, 56, 63]
    assert parsed.num_truncated == 6


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (history([]), "empty"),
        ({**history([1, 2]), protocol.HISTORY_TIMESTAMPS: np.array([[1]])}, "has 1 values"),
        (history([1, 2, 3], timestamps=[5, 9, 2]), r"history_timestamps\[2\]=2 < history_timestamps\[1\]=9"),
        (history([1, 2], actions=[1, -2]), r"history_actions\[1\]=-2 is negative"),
        (history([1, 2], timestamps=[-1, 5]), r"history_timestamps\[0\]=-1 is not unix seconds"),
        (history([1, 2], timestamps=[1, 1_700_000_000_000]), "milliseconds"),  # a unit mistake
        (history([1], timestamps=[np.iinfo(np.int64).max]), "is not unix seconds in"),
        (history([1], timestamps=[np.iinfo(np.int64).min]), "is not unix seconds in"),
        (history([10**9]), "none of the 1 history item ids"),
        ({k: np.repeat(v, 2, axis=0) for k, v in history([1, 2]).items()}, "one user per request"),
    ],
)
def test_bad_histories_name_the_problem(catalogue: h.Catalogue, request_: h.Request, message: str) -> None:
    with pytest.raises(h.RequestError, match=message):
        h.parse_history(request_, catalogue, max_len=50)


def test_history_over_the_event_limit_is_refused_before_the_ids_are_read(catalogue: h.Catalogue) -> None:
    raw = catalogue.vocab.raw_ids
    limits = h.Limits(max_history_events=5)
    assert len(h.parse_history(history(raw[:5]), catalogue, max_len=50, limits=limits).items) == 5
    with pytest.raises(h.RequestError, match="has 6 events, more than this server's limit of 5"):
        h.parse_history(history(raw[:6]), catalogue, max_len=50, limits=limits)


def test_the_encoder_checks_k_for_the_steps_after_it(tiny_checkpoint: Path, catalogue: h.Catalogue) -> None:
    """Over the limit fails at the first step, so the prefill is never paid for it; within it the optional
    input changes nothing."""
    model, _ = load_checkpoint(tiny_checkpoint)
    encoder = h.UserEncoder(TorchRuntime(tiny_checkpoint), catalogue, model.config.max_len, h.Limits(max_k=4))
    good = history(catalogue.vocab.raw_ids[:3])
    out = encoder.execute([good, *({**good, protocol.K: np.array([[k]], np.int32)} for k in (4, 5, 0))])
    assert isinstance(out[0], dict) and isinstance(out[1], dict)
    np.testing.assert_array_equal(out[0][h.KV_KEYS], out[1][h.KV_KEYS])
    for i in (2, 3):
        assert isinstance(out[i], h.RequestError) and re.search(r"'k' must be in 1\.\.4", str(out[i])), out[i]


def test_ratings_map_to_the_training_action_ids(catalogue: h.Catalogue) -> None:
    values = catalogue.action_values
    ratings = np.array([0, values[0], values[-1], values[-1] + 10])
    assert catalogue.actions(ratings).tolist() == [0, 1, len(values), len(values)]


def test_a_bad_request_fails_alone_in_its_batch(tiny_checkpoint: Path, catalogue: h.Catalogue) -> None:
    model, _ = load_checkpoint(tiny_checkpoint)
    assert isinstance(model, HSTU)
    encoder = h.UserEncoder(TorchRuntime(tiny_checkpoint), catalogue, model.config.max_len, h.Limits())
    raw = catalogue.vocab.raw_ids
    good_short, good_long = history(raw[:3]), history(raw[5:20])
    results = encoder.execute([good_short, history([]), good_long])
    assert isinstance(results[1], h.RequestError)
    alone = encoder.execute([good_short])[0]
    assert isinstance(alone, dict) and isinstance(results[0], dict)
    # Batched with a longer history, the short one's outputs are those it gets alone.
    for name in (h.USER_EMBEDDING, h.KV_KEYS, h.KV_VALUES):
        np.testing.assert_allclose(results[0][name], alone[name], rtol=1e-5, atol=1e-6)
    assert results[2][h.KV_KEYS].shape[2] == 15


def test_a_scorer_request_without_its_cache_fails_alone(tiny_checkpoint: Path, catalogue: h.Catalogue) -> None:
    model, _ = load_checkpoint(tiny_checkpoint)
    assert isinstance(model, HSTU)
    c = model.config
    encoder = h.UserEncoder(TorchRuntime(tiny_checkpoint), catalogue, c.max_len, h.Limits())
    encoded = encoder.execute([history(catalogue.vocab.raw_ids[:4])])[0]
    assert isinstance(encoded, dict)
    scorer = h.CandidateScorer(TorchRuntime(tiny_checkpoint), catalogue, (c.num_layers, c.num_heads, c.d_qk, c.d_v), h.Limits())
    good = {**encoded, protocol.CANDIDATE_ITEM_IDS: catalogue.vocab.raw_ids[5:8][None]}
    missing = {k: v for k, v in good.items() if k != h.KV_KEYS}
    empty = {**good, h.KV_KEYS: good[h.KV_KEYS][:, :, :0], h.KV_VALUES: good[h.KV_VALUES][:, :, :0],
             h.KV_TIMESTAMPS: good[h.KV_TIMESTAMPS][:, :0]}
    nan_user = {**good, h.USER_EMBEDDING: np.full_like(good[h.USER_EMBEDDING], np.nan)}
    inf_keys = {**good, h.KV_KEYS: np.full_like(good[h.KV_KEYS], np.inf)}
    too_many = {**good, protocol.CANDIDATE_ITEM_IDS: np.resize(catalogue.vocab.raw_ids, h.Limits.max_candidates + 1)[None]}
    ms_times = {**good, h.KV_TIMESTAMPS: good[h.KV_TIMESTAMPS] * 1000 + 1_700_000_000_000}
    results = scorer.execute([good, missing, empty, nan_user, inf_keys, too_many, ms_times])
    assert isinstance(results[0], dict) and results[0][protocol.SCORES].shape == (1, 3)
    messages = [f"missing input '{h.KV_KEYS}'", "at least one event", f"'{h.USER_EMBEDDING}' holds NaN",
                f"'{h.KV_KEYS}' holds NaN or infinite", "more than this server's limit",
                f"{h.KV_TIMESTAMPS}[0]=1700000000000 is not unix seconds"]
    for result, message in zip(results[1:], messages, strict=True):
        assert isinstance(result, h.RequestError) and message in str(result), (result, message)


def test_retrieval_and_top_n_reject_what_would_have_failed_or_been_dropped(tiny_checkpoint: Path, tmp_path: Path) -> None:
    build_repository(BuildConfig(checkpoint=tiny_checkpoint, repository=tmp_path, retrieve_k=10))
    retrieval = h.load_handler("item_retrieval", tmp_path / "item_retrieval" / "1", {"max_k": "10"})
    assert isinstance(retrieval, h.ItemRetrieval)
    d = retrieval.table.shape[1]
    base = {protocol.HISTORY_ITEM_IDS: np.array([[1]]), protocol.EXCLUDE_SEEN: np.array([[True]])}
    bad = [{**base, h.USER_EMBEDDING: np.full((1, d), np.nan, np.float32)},
           {**base, h.USER_EMBEDDING: np.ones((1, d + 1), np.float32)}]
    for result, message in zip(retrieval.execute(bad), ("holds NaN", f"must have {d} values"), strict=True):
        assert isinstance(result, h.RequestError) and message in str(result)
    top = h.TopN(h.Limits())
    ids = np.arange(1, 11)[None]
    for scores, message in ((np.zeros((1, 3), np.float32), "has 3 values for 10"),
                            (np.zeros((1, 100_000), np.float32), "has 100000 values for 10"),
                            (np.full((1, 10), np.nan, np.float32), "holds NaN")):
        result = top.execute([{h.RETRIEVED_ITEM_IDS: ids, h.CANDIDATE_SCORES: scores, protocol.K: np.array([[2]])}])[0]
        assert isinstance(result, h.RequestError) and message in str(result)


def test_top_n_orders_by_score_and_checks_k() -> None:
    top = h.TopN(h.Limits())
    ids = np.array([[10, 20, 30, 40]])
    scores = np.array([[0.5, 2.0, 0.5, 1.0]], np.float32)
    request = {h.RETRIEVED_ITEM_IDS: ids, h.CANDIDATE_SCORES: scores, protocol.K: np.array([[3]])}
    result = top.execute([request])[0]
    assert isinstance(result, dict)
    assert result[protocol.ITEM_IDS].tolist() == [[20, 40, 10]]  # the tie 10/30 keeps retrieval order
    for k in (0, -2, 101):
        error = top.execute([{**request, protocol.K: np.array([[k]])}])[0]
        assert isinstance(error, h.RequestError) and "must be in 1..100" in str(error)
    fewer = top.execute([{**request, protocol.K: np.array([[5]])}])[0]  # 4 candidates: all of them
    assert isinstance(fewer, dict) and fewer[protocol.ITEM_IDS].tolist() == [[20, 40, 10, 30]]


def test_build_adds_versions_and_writes_the_specs(tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = BuildConfig(checkpoint=tiny_checkpoint, repository=tmp_path, retrieve_k=20)
    assert build_repository(config) == 1
    assert build_repository(config) == 2 == next_version(tmp_path) - 1
    model, _ = load_checkpoint(tiny_checkpoint)
    assert isinstance(model, HSTU)
    for spec in model_specs(model.config, config, version=2):
        assert read_config(tmp_path / spec.name / "config.pbtxt") == to_model_config(spec)
        assert sorted(p.name for p in (tmp_path / spec.name).iterdir() if p.is_dir()) == ["1", "2"]
        steps = read_config(tmp_path / spec.name / "config.pbtxt").ensemble_scheduling.step
        assert all(step.model_version == 2 for step in steps)  # an ensemble runs on its own build only
    assert (tmp_path / "user_encoder" / "2" / "model.py").exists()
    recorded = json.loads((tmp_path / "recommender" / "2" / BUILD_CONFIG_FILE).read_text())
    assert recorded["retrieve_k"] == 20 and recorded["checkpoint"] == str(tiny_checkpoint)
    with pytest.raises(ValueError, match="retrieve_k"):
        build_repository(BuildConfig(checkpoint=tiny_checkpoint, repository=tmp_path, retrieve_k=10**6))
    assert next_version(tmp_path) == 3  # a failed build leaves no version behind


def test_a_user_who_has_seen_nearly_everything_is_retrieved_alongside_others(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """All but 3 items seen, with a retrieval depth of 10: that user gets the 3 it has not seen, and a normal
    user in the same batch gets exactly what it gets alone (once the whole batch failed with INTERNAL)."""
    build_repository(BuildConfig(checkpoint=tiny_checkpoint, repository=tmp_path, retrieve_k=10))
    retrieval = h.load_handler("item_retrieval", tmp_path / "item_retrieval" / "1", {"max_k": "10"})
    raw = h.Catalogue.from_meta(load_meta(tiny_checkpoint)).vocab.raw_ids
    user = np.ones((1, retrieval.table.shape[1]), np.float32) / np.sqrt(retrieval.table.shape[1])
    seen = {protocol.EXCLUDE_SEEN: np.array([[True]]), h.USER_EMBEDDING: user}
    heavy = {**seen, protocol.HISTORY_ITEM_IDS: raw[3:][None]}
    normal = {**seen, protocol.HISTORY_ITEM_IDS: raw[:2][None]}
    both = retrieval.execute([heavy, normal])
    alone = retrieval.execute([normal])[0]
    assert isinstance(both[0], dict) and isinstance(both[1], dict) and isinstance(alone, dict)
    assert sorted(both[0][h.RETRIEVED_ITEM_IDS][0].tolist()) == sorted(raw[:3].tolist())
    assert both[1][h.RETRIEVED_ITEM_IDS].tolist() == alone[h.RETRIEVED_ITEM_IDS].tolist()
    assert both[1][h.RETRIEVED_ITEM_IDS].shape == (1, 10)
    # and top_n then serves the heavy user's 3, also when asked for 5: all that is left
    top = h.TopN(h.Limits())
    request = {h.RETRIEVED_ITEM_IDS: both[0][h.RETRIEVED_ITEM_IDS], h.CANDIDATE_SCORES: both[0][h.RETRIEVED_SCORES]}
    assert isinstance(top.execute([{**request, protocol.K: np.array([[3]])}])[0], dict)
    fewer = top.execute([{**request, protocol.K: np.array([[5]])}])[0]
    assert isinstance(fewer, dict) and fewer[protocol.ITEM_IDS].shape == (1, 3)


def test_faiss_retrieval_matches_brute_force_on_a_small_catalogue(tiny_checkpoint: Path, tmp_path: Path) -> None:
    exact_repo, faiss_repo = tmp_path / "exact", tmp_path / "faiss"
    build_repository(BuildConfig(checkpoint=tiny_checkpoint, repository=exact_repo, retrieve_k=10))
    build_repository(BuildConfig(checkpoint=tiny_checkpoint, repository=faiss_repo, retrieve_k=10, faiss="hnsw"))
    params = {"max_k": "10"}
    exact = h.load_handler("item_retrieval", exact_repo / "item_retrieval" / "1", params)
    approx = h.load_handler("item_retrieval", faiss_repo / "item_retrieval" / "1", params)
    assert isinstance(approx, h.ItemRetrieval) and approx.index is not None
    rng = np.random.default_rng(0)
    catalogue = h.Catalogue.from_meta(load_meta(tiny_checkpoint))
    requests = []
    for _ in range(8):
        user = rng.normal(size=(1, exact.table.shape[1])).astype(np.float32)
        seen = catalogue.vocab.raw_ids[rng.choice(len(catalogue.vocab), 5, replace=False)][None]
        requests.append({h.USER_EMBEDDING: user / np.linalg.norm(user), protocol.HISTORY_ITEM_IDS: seen,
                         protocol.EXCLUDE_SEEN: np.array([[True]])})
    for want, got, request in zip(exact.execute(requests), approx.execute(requests), requests, strict=True):
        assert isinstance(want, dict) and isinstance(got, dict)
        assert not set(got[h.RETRIEVED_ITEM_IDS][0]) & set(request[protocol.HISTORY_ITEM_IDS][0])
        overlap = len(set(want[h.RETRIEVED_ITEM_IDS][0]) & set(got[h.RETRIEVED_ITEM_IDS][0]))
        assert overlap >= 9  # HNSW on 120 items is close to exact


def test_length_groups_keep_padding_small() -> None:
    lengths = np.array([500, 3, 40, 20, 510, 35, 300])
    groups = length_groups(lengths)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    for group in groups:
        assert lengths[group].max() <= max(32, 1.5 * lengths[group].min())


def test_served_processes_do_not_import_the_training_stack() -> None:
    """Every Python-backend process imports the handlers: pandas, pyarrow and faiss (training and index
    building) must not come with them."""
    code = "import sys, genrec.builders.handlers; print(sorted({'pandas', 'pyarrow', 'faiss'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
