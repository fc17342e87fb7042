"""Checkpoints: weights, config and vocabulary survive save/load exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from genrec.training.batch import SequenceBatch
from genrec.training.checkpoint import CheckpointMeta, load_checkpoint, load_meta, save_checkpoint
from genrec.training.embeddings import ItemFeatures
from genrec.training.hstu import HSTU, HSTUConfig
from genrec.training.popularity import PopularityConfig, popularity_table
from genrec.training.sasrec import SASRec, SASRecConfig

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_ITEMS = 12


def randomised(model: HSTU | SASRec) -> HSTU | SASRec:
    """Non-default weights and item features, so a load that dropped any of them would show."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    genres = (torch.rand(NUM_ITEMS + 1, 3, generator=g) < 0.5).float().numpy()
    years = torch.randint(0, 3, (NUM_ITEMS + 1,), generator=g).numpy()
    genres[0], years[0] = 0, 0
    model.items.set_features(ItemFeatures(genres, years))
    return model.eval()


def make(model_type: str) -> HSTU | SASRec:
    common = dict(num_items=NUM_ITEMS, num_actions=3, num_genres=3, num_years=2, d_model=8, num_layers=2,
                  num_heads=2, max_len=10)
    if model_type == "hstu":
        times = 1_700_000_000 + np.arange(200) * 5_000
        table = popularity_table(times, np.arange(200) % NUM_ITEMS + 1, NUM_ITEMS, PopularityConfig())
        hstu = HSTU(HSTUConfig(**common, d_qk=4, d_v=3, score_chunk=5, popularity_windows=(86_400,),
                               popularity_buckets=table.num_buckets))
        assert hstu.popularity is not None
        hstu.popularity.set_table(table)
        return randomised(hstu)
    return randomised(SASRec(SASRecConfig(**common)))


def meta_for(model: nn.Module, raw_ids: np.ndarray) -> CheckpointMeta:
    titles = np.array([""] + [f"item ‘{i}’" for i in range(NUM_ITEMS)], dtype=object)
    return CheckpointMeta(
        model_config=model.config,  # type: ignore[arg-type]
        item_raw_ids=raw_ids,
        item_titles=titles,
        action_values=np.array([1.0, 4.5], dtype=np.float32),
        data={"name": "unit", "num_users": 3, "genre_names": ["a", "b", "c"]},
        train={"seed": 0, "out": "runs/x"},
    )


def outputs(model: nn.Module) -> list[torch.Tensor]:
    batch = SequenceBatch.from_lists(
        [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11, 12, 1, 2]],
        [[10, 20, 3000], [5], list(range(100, 1100, 100))],
        [[1, 2, 0], [0], [1] * 10],
    )
    with torch.no_grad():
        if isinstance(model, HSTU):
            cache, user = model.prefill(batch)
            candidates = torch.arange(1, NUM_ITEMS + 1).repeat(3, 1)
            return [user, cache.keys, cache.values, model.score_candidates(cache, user, candidates),
                    model.item_table()]
        assert isinstance(model, SASRec)
        return [model.encode(batch), model.user_embedding(batch), model.item_table()]


@pytest.mark.parametrize("model_type", ["hstu", "sasrec"])
def test_load_gives_bit_identical_outputs(model_type: str, tmp_path: Path) -> None:
    model = make(model_type)
    raw_ids = np.arange(101, 101 + NUM_ITEMS, dtype=np.int64)
    save_checkpoint(tmp_path / "ckpt", model, meta_for(model, raw_ids), {"full": {"HR@10": 0.5}})
    loaded, meta = load_checkpoint(tmp_path / "ckpt")

    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config == model.config  # type: ignore[union-attr]
    for before, after in zip(outputs(model), outputs(loaded), strict=True):
        assert torch.equal(before, after)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert json.loads((tmp_path / "ckpt" / "metrics.json").read_text()) == {"full": {"HR@10": 0.5}}


@pytest.mark.parametrize(
    "raw_ids",
    [
        np.array([3, 7, 2**40, 12, 13, 14, 15, 16, 17, 18, 19, 20], dtype=np.int64),
        # numeric-looking strings must stay strings (not 7, not 1.5)
        np.array(["007", "1.5", "a b", "ü", "x:y", "", "12", "13", "14", "15", "16", "17"], dtype=object),
    ],
    ids=["int", "str"],
)
def test_config_and_vocabulary_round_trip(raw_ids: np.ndarray, tmp_path: Path) -> None:
    model = make("hstu")
    meta = meta_for(model, raw_ids)
    save_checkpoint(tmp_path, model, meta)
    back = load_meta(tmp_path)

    assert back.model_type == "hstu"
    assert back.model_config == model.config
    assert back.item_raw_ids.tolist() == raw_ids.tolist()
    assert all(type(a) is type(b) for a, b in zip(back.item_raw_ids.tolist(), raw_ids.tolist(), strict=True))
    if raw_ids.dtype == object:
        assert back.item_raw_ids.dtype == object
    else:
        assert back.item_raw_ids.dtype == np.int64
    assert back.item_titles.tolist() == meta.item_titles.tolist()
    np.testing.assert_array_equal(back.action_values, meta.action_values)
    assert back.data == meta.data and back.train == meta.train
    assert not (tmp_path / "metrics.json").exists()  # none given, none written


def test_load_rejects_what_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path)
    model = make("sasrec")
    save_checkpoint(tmp_path, model, meta_for(model, np.arange(1, NUM_ITEMS + 1)))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "format_version": 999}))
    with pytest.raises(ValueError, match="format 999"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt"}))
    with pytest.raises(ValueError, match="unknown model type 'gpt'"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    meta = load_meta(tmp_path)
    assert meta.model_type == "sasrec" and meta.model_config == model.config
    with pytest.raises(ValueError, match="only HSTU checkpoints can be served"):
        meta.hstu_config()
