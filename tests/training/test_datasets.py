"""Loaders: real ML-100K, MovieLens formats and generic tables on generated files, errors, synthetic data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from genrec.training.datasets import (
    ColumnMapping,
    DataFormatError,
    Interactions,
    SyntheticConfig,
    cache_dir,
    load_ml100k,
    load_movielens_ratings,
    load_table,
    main,
    synthetic,
)
from genrec.training.sequences import PreprocessConfig, build_sequences


@pytest.fixture(scope="module")
def ml100k() -> Interactions:
    return load_ml100k()


def test_ml100k_is_the_real_dataset(ml100k: Interactions) -> None:
    assert len(ml100k) == 100_000
    assert len(np.unique(ml100k.user)) == 943
    assert len(np.unique(ml100k.item)) == 1682
    assert ml100k.user.dtype == np.int64 and ml100k.item.dtype == np.int64
    assert ml100k.rating is not None and set(np.unique(ml100k.rating)) == {1, 2, 3, 4, 5}
    assert ml100k.timestamp.min() > 870_000_000  # 1997-1998

    items = ml100k.item_features
    assert items is not None and len(items) == 1682
    assert items.loc[1, "title"] == "Toy Story" and items.loc[1, "year"] == 1995
    assert items.loc[1, "genres"] == ("Animation", "Children's", "Comedy")
    users = ml100k.user_features
    assert users is not None and len(users) == 943
    assert users.loc[1, "age"] == 24 and users.loc[1, "occupation"] == "technician"
    assert users.loc[8, "zip_code"] == "05201"  # kept as text


def test_ratings_dat_with_movies(tmp_path: Path) -> None:
    (tmp_path / "ratings.dat").write_text("2::20::3::978300760\n1::10::5::978302109\n1::30::4::978301968\n")
    (tmp_path / "movies.dat").write_bytes(
        "10::Toy Story (1995)::Animation|Children's|Comedy\n20::Café (1999)::Drama\n".encode("latin-1")
    )
    log = load_movielens_ratings(tmp_path / "ratings.dat")
    np.testing.assert_array_equal(log.user, [2, 1, 1])
    np.testing.assert_array_equal(log.item, [20, 10, 30])
    np.testing.assert_array_equal(log.timestamp, [978300760, 978302109, 978301968])
    assert log.rating is not None
    np.testing.assert_array_equal(log.rating, np.array([3, 5, 4], dtype=np.float32))
    movies = log.item_features
    assert movies is not None
    assert movies.loc[10, "title"] == "Toy Story (1995)" and movies.loc[10, "year"] == 1995
    assert movies.loc[10, "genres"] == ("Animation", "Children's", "Comedy")
    assert movies.loc[20, "title"] == "Café (1999)"  # ML-1M's movies.dat is latin-1


def test_ratings_csv_with_movies(tmp_path: Path) -> None:
    (tmp_path / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,296,5.0,1147880044\n1,306,3.5,1147868817\n2,296,0.5,1147868828\n"
    )
    (tmp_path / "movies.csv").write_text(
        "movieId,title,genres\n"
        '296,"American President, The (1995)",Comedy|Drama|Romance\n'
        "306,Untitled,(no genres listed)\n"
    )
    log = load_movielens_ratings(tmp_path / "ratings.csv")
    np.testing.assert_array_equal(log.user, [1, 1, 2])
    assert log.rating is not None
    np.testing.assert_array_equal(log.rating, np.array([5.0, 3.5, 0.5], dtype=np.float32))
    movies = log.item_features
    assert movies is not None
    assert movies.loc[296, "title"] == "American President, The (1995)" and movies.loc[296, "year"] == 1995
    assert movies.loc[306, "year"] == 0 and movies.loc[306, "genres"] == ()


def test_ratings_without_movies_file(tmp_path: Path) -> None:
    (tmp_path / "ratings.dat").write_text("1::10::5::978302109\n")
    assert load_movielens_ratings(tmp_path / "ratings.dat").item_features is None


def test_table_csv_with_string_ids_and_datetime_strings(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "who,what,when,score\n"
        "alice,sku-1,2020-01-01T00:00:00Z,1\n"
        "bob,sku-2,2020-01-01 00:01:00,\n"  # naive times are UTC; an empty score is an unknown action
        "alice,sku-2,2020-01-02T00:00:00+01:00,2\n"
    )
    log = load_table(path, ColumnMapping(user="who", item="what", timestamp="when", rating="score"))
    assert log.user.dtype == object and list(log.user) == ["alice", "bob", "alice"]
    assert list(log.item) == ["sku-1", "sku-2", "sku-2"]
    np.testing.assert_array_equal(log.timestamp, [1577836800, 1577836860, 1577919600])
    assert log.rating is not None and np.isnan(log.rating[1]) and log.rating[2] == 2
    assert log.name == "events"


def test_table_parquet_with_datetime_column(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    pd.DataFrame(
        {
            "user_id": np.array([7, 8], dtype=np.int64),
            "item_id": np.array([100, 200], dtype=np.int64),
            "timestamp": pd.to_datetime(["2021-06-01 12:00:00", "2021-06-02 12:00:00"]),
        }
    ).to_parquet(path)
    log = load_table(path, ColumnMapping())
    assert log.user.dtype == np.int64 and log.item.dtype == np.int64
    np.testing.assert_array_equal(log.timestamp, [1622548800, 1622635200])
    assert log.rating is None


def test_table_csv_with_unix_seconds(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\n1,5,100\n2,5,200\n")
    log = load_table(path)
    np.testing.assert_array_equal(log.timestamp, [100, 200])
    assert log.item.dtype == np.int64


def test_a_table_without_time_keeps_each_users_file_order(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id\n1,30\n2,7\n1,10\n1,20\n2,5\n1,40\n2,6\n")
    log = load_table(path, ColumnMapping(timestamp=None))
    assert not log.timed and (log.timestamp == 0).all()
    data = build_sequences(log, PreprocessConfig(min_user_interactions=3))
    assert not data.timed
    raw = [data.item_vocab.to_raw(data.sequence(u)[0]).tolist() for u in range(len(data.users))]
    assert raw == [[30, 10, 20, 40], [7, 5, 6]]


def test_a_table_without_time_still_needs_its_other_columns(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user_id,sku\n1,30\n")
    with pytest.raises(DataFormatError, match="item_id"):
        load_table(path, ColumnMapping(timestamp=None))


def test_a_missing_time_column_says_how_to_load_a_log_without_time(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id\n1,30\n")
    with pytest.raises(DataFormatError, match="missing column 'timestamp'.*--time-col none"):
        load_table(path)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "ratings.dat",
            "1::2::3::4\n1::3::4::5\n1::4::5\n",
            "ratings.dat:3: expected 4 fields separated by '::', got 3",
        ),
        (
            "ratings.dat",
            "1::2::3::4\n1::3::4::5::6\n",
            "ratings.dat:2: expected 4 fields separated by '::', got 5",
        ),
        (
            "ratings.dat",
            "1::2::3::4\n\n1::2::3::4\n",
            "ratings.dat:2: expected 4 fields separated by '::', got 0",
        ),
        (
            "ratings.dat",
            "1::2::3::4\n1::3::4::yesterday\n",
            "ratings.dat:2: non-integer timestamp 'yesterday'",
        ),
        (
            "ratings.csv",
            "userId,movieId,rating,timestamp\n1,2,3,4\n1,3,4,x5\n",
            "ratings.csv:3: non-integer timestamp",
        ),
        (
            "ratings.csv",
            "userId,movieId,rating\n1,2,3\n",
            "ratings.csv:1: missing column 'timestamp' (available: 'userId'",
        ),
        (
            "ratings.csv",
            "userId,movieId,rating,timestamp\n1,2,3,4,5\n",
            "ratings.csv:2: more fields than columns",
        ),
        (
            "ratings.csv",
            "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,3,4,5\n",
            "ratings.csv:3: expected 4 fields",
        ),
        ("ratings.dat", "1::2::3::4::5\n", "ratings.dat:1: more fields than columns separated by '::'"),
        ("ratings.dat", "", "ratings.dat: empty file"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n", "ratings.csv: empty file"),
    ],
)
def test_bad_movielens_files_name_file_and_line(tmp_path: Path, name: str, text: str, expected: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(DataFormatError) as info:
        load_movielens_ratings(tmp_path / name)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("user_id,item_id,timestamp\n1,2,3\n,2,4\n", "events.csv:3: missing value in column 'user_id'"),
        (
            "user_id,item_id,timestamp\n1,2,2020-01-01\n1,3,2020-01-02\n1,4,soon\n",
            "events.csv:4: unparseable timestamp 'soon'",
        ),
        ("user_id,item\n1,2\n", "events.csv:1: missing column 'item_id' (available: 'user_id', 'item')"),
        ("", "events.csv: empty file"),
    ],
)
def test_bad_tables_name_file_and_line(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "events.csv").write_text(text)
    with pytest.raises(DataFormatError) as info:
        load_table(tmp_path / "events.csv", ColumnMapping())
    assert expected in str(info.value)


def test_parquet_nulls_name_the_row(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    pd.DataFrame({"user_id": [1, None], "item_id": [2, 3], "timestamp": [4, 5]}).to_parquet(path)
    with pytest.raises(DataFormatError, match=r"events\.parquet: row 2: missing value in column 'user_id'"):
        load_table(path, ColumnMapping())


def test_synthetic_is_deterministic() -> None:
    a, b = synthetic(SyntheticConfig(seed=3)), synthetic(SyntheticConfig(seed=3))
    for x, y in ((a.user, b.user), (a.item, b.item), (a.timestamp, b.timestamp), (a.rating, b.rating)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.item, synthetic(SyntheticConfig(seed=4)).item)


def test_synthetic_plants_the_successor_rule() -> None:
    config = SyntheticConfig()
    log = synthetic(config)
    assert len(np.unique(log.user)) == config.num_users and set(np.unique(log.item)) <= set(range(1, 201))
    data = build_sequences(log)
    lengths = data.lengths()
    assert lengths.min() >= config.min_len and lengths.max() <= config.max_len

    same_user = np.repeat(np.arange(len(lengths)), lengths)
    pairs = same_user[1:] == same_user[:-1]
    current, following = data.items[:-1][pairs], data.items[1:][pairs]
    assert np.all(np.diff(data.timestamps)[pairs] > 0)
    # The hidden successor of each item is its most frequent next item.
    counts = np.zeros((len(data.item_vocab) + 1,) * 2, dtype=np.int64)
    np.add.at(counts, (current, following), 1)
    successor = counts.argmax(axis=1)
    followed = successor[current] == following
    assert 0.87 < followed.mean() < 0.93  # follow_prob = 0.9, plus a 1-in-200 random jump onto it
    assert (
        len(np.unique(successor[1:])) == config.num_items
    )  # a permutation: every item has its own successor
    # Ratings are high exactly on successor steps.
    assert data.action_values.tolist() == [1, 2, 3, 4, 5]
    assert np.mean(data.actions[1:][pairs][followed] >= 4) > 0.99
    # Popularity is near uniform, so a popularity model stays near chance (10 / num_items).
    share = np.bincount(data.items) / len(data.items)
    assert share.max() < 3 / config.num_items


def test_fetch_command_reuses_a_complete_copy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_ml100k()  # makes sure the shared cache holds the files
    (tmp_path / "ml-100k").mkdir()
    for name in ("ml-100k.inter", "ml-100k.user", "ml-100k.item"):
        shutil.copy(cache_dir() / "ml-100k" / name, tmp_path / "ml-100k" / name)
    main(["--fetch-ml100k", "--data-dir", str(tmp_path)])
    assert capsys.readouterr().out.strip() == str(tmp_path / "ml-100k")
    assert len(load_ml100k(tmp_path)) == 100_000
