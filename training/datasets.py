"""Interaction logs from files (MovieLens, any CSV/Parquet) or a synthetic generator, as one type.

Every loader returns `Interactions`: raw ids, unix-second timestamps, optional ratings and features.
Turning a log into dense per-user sequences is `sequences.py`'s job.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Interactions:
    """An interaction log: one row per event."""

    user: np.ndarray  # (N,) raw user ids (int64, or object array of str)
    item: np.ndarray  # (N,) raw item ids (int64, or object array of str)
    timestamp: np.ndarray  # (N,) int64 unix seconds; all 0 when the log has no time (``timed`` False)
    rating: np.ndarray | None  # (N,) float32 rating/action value (NaN unknown), None when the log has none
    name: str
    # index = raw user id; columns e.g. age, gender, occupation
    user_features: pd.DataFrame | None = None
    # index = raw item id; columns title (str), year (int, 0 unknown), genres (tuple[str, ...])
    item_features: pd.DataFrame | None = None
    # False: the log is only ordered (each user's events in file order); nothing time-based is learned from it
    timed: bool = True

    def __len__(self) -> int:
        return len(self.user)


class DataFormatError(ValueError):
    """A file the loaders cannot read, with the file, the 1-based line where known, and the problem."""

    def __init__(self, path: Path, problem: str, line: int | None = None) -> None:
        where = path.name if line is None else f"{path.name}:{line}"
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.line = line


@dataclass(frozen=True)
class _Source:
    """A file being parsed: maps a 0-based data row to a position a person can find in the file."""

    path: Path
    first_line: int | None  # 1-based line of data row 0; None for binary formats (rows are reported instead)

    def error(self, problem: str, row: int | None = None) -> DataFormatError:
        if row is None:
            return DataFormatError(self.path, problem)
        if self.first_line is None:
            return DataFormatError(self.path, f"row {row + 1}: {problem}")
        return DataFormatError(self.path, problem, self.first_line + row)


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _require_present(values: pd.Series, column: str, source: _Source) -> None:
    missing = values.isna().to_numpy()
    if missing.any():
        raise source.error(f"missing value in column {column!r}", _first(missing))


def _as_int64(values: pd.Series, column: str, source: _Source) -> np.ndarray:
    """(N,) int64; integral floats ("881250949.0") are accepted, anything else names its line."""
    _require_present(values, column, source)
    if pd.api.types.is_integer_dtype(values.dtype):
        return values.to_numpy(np.int64)
    numeric = pd.to_numeric(values, errors="coerce")
    bad = (numeric.isna() | (numeric % 1 != 0)).to_numpy()
    if bad.any():
        row = _first(bad)
        raise source.error(f"non-integer {column} {values.iloc[row]!r}", row)
    return numeric.to_numpy(np.int64)


def _as_float32(values: pd.Series, column: str, source: _Source) -> np.ndarray:
    """(N,) float32; nulls become NaN (an unknown action), non-numbers name their line."""
    numeric = pd.to_numeric(values, errors="coerce")
    bad = (numeric.isna() & values.notna()).to_numpy()
    if bad.any():
        row = _first(bad)
        raise source.error(f"non-numeric {column} {values.iloc[row]!r}", row)
    return numeric.to_numpy(np.float32, na_value=np.nan)


def _as_ids(values: pd.Series, column: str, source: _Source) -> np.ndarray:
    """Integer columns stay int64; anything else becomes an object array of str."""
    _require_present(values, column, source)
    if pd.api.types.is_integer_dtype(values.dtype):
        return values.to_numpy(np.int64)
    return values.astype(str).to_numpy(dtype=object)


def _is_number(value: object) -> bool:
    return bool(pd.notna(pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0]))


def _as_unix_seconds(values: pd.Series, column: str, source: _Source) -> np.ndarray:
    """Unix seconds from integers, datetimes, or datetime strings (naive times are taken as UTC)."""
    _require_present(values, column, source)
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        times = pd.to_datetime(values, utc=True)
    elif pd.api.types.is_numeric_dtype(values.dtype) or _is_number(values.iloc[0]):
        return _as_int64(values, column, source)  # numbers with a typo among them stay numbers
    else:
        times = pd.to_datetime(values, utc=True, errors="coerce", format="mixed")
        bad = times.isna().to_numpy()
        if bad.any():
            row = _first(bad)
            raise source.error(f"unparseable {column} {values.iloc[row]!r}", row)
    return ((times - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(np.int64)


def _read_csv(
    source: _Source, data: str | io.BytesIO | Path, separated: str = "", **kwargs: object
) -> pd.DataFrame:
    """pandas' C parser, with its errors turned into DataFormatError with a line number.

    `separated` completes the field-count message, e.g. " separated by '::'".
    """
    try:
        with warnings.catch_warnings():
            # pandas only warns, and drops the extra fields, when the first data row is the long one
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(data, skip_blank_lines=False, index_col=False, **kwargs)  # type: ignore[call-overload]
    except pd.errors.EmptyDataError:
        raise source.error("empty file") from None
    except pd.errors.ParserWarning:
        raise source.error(f"more fields than columns{separated}", 0) from None
    except pd.errors.ParserError as e:
        match = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        if match is None:
            raise source.error(str(e)) from e
        want, line, saw = match.groups()
        raise DataFormatError(
            source.path, f"expected {want} fields{separated}, got {saw}", int(line)
        ) from None


def _check_columns(
    frame: pd.DataFrame, wanted: list[str], source: _Source, hints: dict[str, str] | None = None
) -> None:
    for column in wanted:
        if column not in frame.columns:
            available = ", ".join(repr(str(c)) for c in frame.columns)
            header = None if source.first_line is None else 1
            hint = (hints or {}).get(column, "")
            raise DataFormatError(source.path, f"missing column {column!r} (available: {available}){hint}", header)


# ---------------------------------------------------------------------------------------------------------
# MovieLens-100K, as shipped inside the recbole wheel (real data, reachable through PyPI alone)

ML100K_WHEEL = "recbole==1.2.1"
_ML100K_IN_WHEEL = "recbole/dataset_example/ml-100k"
_ML100K_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")


def cache_dir(data_dir: Path | None = None) -> Path:
    """`data_dir`, else $GENREC_DATA, else ~/.cache/genrec."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get("GENREC_DATA")
    return Path(env) if env else Path.home() / ".cache" / "genrec"


def fetch_ml100k(cache: Path) -> Path:
    """Download the recbole wheel with pip and extract the three ML-100K files; returns their folder.

    Atomic: files are extracted into a temporary folder beside the target and renamed into place,
    so an interrupted fetch never leaves a half-written dataset behind.
    """
    target = cache / "ml-100k"
    if all((target / name).is_file() for name in _ML100K_FILES):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", ML100K_WHEEL, "-d", tmp]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"could not download {ML100K_WHEEL} (it ships ML-100K) with pip:\n{done.stderr}"
            )
        wheel = next(Path(tmp).glob("recbole-*.whl"))
        staged = Path(tmp) / "ml-100k"
        staged.mkdir()
        with zipfile.ZipFile(wheel) as archive:
            for name in _ML100K_FILES:
                (staged / name).write_bytes(archive.read(f"{_ML100K_IN_WHEEL}/{name}"))
        if target.exists():  # an incomplete earlier copy
            shutil.rmtree(target)
        staged.rename(target)
    return target


def _read_recbole(path: Path, text: tuple[str, ...] = ()) -> pd.DataFrame:
    """A recbole atomic file: tab-separated, header `name:type`; `text` columns are read as str."""
    source = _Source(path, first_line=2)
    with path.open() as f:
        names = [field.split(":")[0] for field in f.readline().rstrip("\n").split("\t")]
    dtype = {name: str for name in text}
    return _read_csv(
        source, path, sep="\t", header=0, names=names, dtype=dtype, keep_default_na=False, quoting=3
    )


def load_ml100k(data_dir: Path | None = None) -> Interactions:
    """MovieLens-100K: 100,000 ratings (1-5) by 943 users of 1,682 movies, with user and movie features."""
    folder = fetch_ml100k(cache_dir(data_dir))
    inter_path, user_path, item_path = (folder / name for name in _ML100K_FILES)

    inter = _read_recbole(inter_path)
    source = _Source(inter_path, first_line=2)
    _check_columns(inter, ["user_id", "item_id", "rating", "timestamp"], source)

    users = _read_recbole(user_path, ("gender", "occupation", "zip_code"))
    user_source = _Source(user_path, first_line=2)
    user_features = pd.DataFrame(
        {
            "age": _as_int64(users["age"], "age", user_source),
            "gender": users["gender"].to_numpy(dtype=object),
            "occupation": users["occupation"].to_numpy(dtype=object),
            "zip_code": users["zip_code"].to_numpy(dtype=object),
        },
        index=pd.Index(_as_int64(users["user_id"], "user_id", user_source), name="user_id"),
    )

    items = _read_recbole(item_path, ("movie_title", "release_year", "class"))
    item_source = _Source(item_path, first_line=2)
    # two rows hold 'V' and 'unkonwn' as their year
    years = pd.to_numeric(items["release_year"], errors="coerce").fillna(0).to_numpy(np.int64)
    item_features = pd.DataFrame(
        {
            "title": items["movie_title"].to_numpy(dtype=object),
            "year": years,
            "genres": [tuple(g.split()) for g in items["class"]],
        },
        index=pd.Index(_as_int64(items["item_id"], "item_id", item_source), name="item_id"),
    )

    return Interactions(
        user=_as_int64(inter["user_id"], "user_id", source),
        item=_as_int64(inter["item_id"], "item_id", source),
        timestamp=_as_int64(inter["timestamp"], "timestamp", source),
        rating=_as_float32(inter["rating"], "rating", source),
        name="ml-100k",
        user_features=user_features,
        item_features=item_features,
    )


# ---------------------------------------------------------------------------------------------------------
# MovieLens ratings.dat (1M, 10M) and ratings.csv (20M, 25M, 32M)

_YEAR = re.compile(r"\((\d{4})\)\s*$")
_RATING_COLUMNS = ["userId", "movieId", "rating", "timestamp"]


def _read_dat(path: Path, names: list[str]) -> pd.DataFrame:
    """A headerless '::'-separated file. '::' is swapped for a tab so pandas' C parser does the work
    (its python engine, the only one taking a multi-char separator, is ~20x slower on 10M rows)."""
    source = _Source(path, first_line=1)
    raw = path.read_bytes()
    if b"\t" in raw:
        line = raw[: raw.index(b"\t")].count(b"\n") + 1
        raise DataFormatError(path, "unexpected tab character in a '::'-separated file", line)
    separated = " separated by '::'"
    frame = _read_csv(
        source, io.BytesIO(raw.replace(b"::", b"\t")), separated, sep="\t", header=None, names=names
    )
    short = frame[names[-1]].isna().to_numpy()
    if short.any():  # pandas pads short rows with NaN; count the fields of the first one for the message
        row = _first(short)
        text = raw.split(b"\n")[row].decode("utf-8", errors="replace").rstrip("\r")
        got = len(text.split("::")) if text else 0
        raise source.error(f"expected {len(names)} fields{separated}, got {got}", row)
    return frame


def _movies(folder: Path, is_dat: bool) -> pd.DataFrame | None:
    """movies.dat / movies.csv in `folder`: title, year (from "Title (1995)"), '|'-separated genres."""
    movies_path = folder / ("movies.dat" if is_dat else "movies.csv")
    if not movies_path.is_file():
        return None
    source = _Source(movies_path, first_line=1 if is_dat else 2)
    if is_dat:  # ML-1M is latin-1; titles may hold any character but '::'
        raw = movies_path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        rows = [line.split("::") for line in text.splitlines()]
        for row, fields in enumerate(rows):
            if len(fields) != 3:
                raise source.error(f"expected 3 fields separated by '::', got {len(fields)}", row)
        frame = pd.DataFrame(rows, columns=["movieId", "title", "genres"])
    else:
        frame = _read_csv(source, movies_path, dtype={"title": str, "genres": str}, keep_default_na=False)
        _check_columns(frame, ["movieId", "title", "genres"], source)
    ids = _as_int64(frame["movieId"], "movieId", source)
    titles = frame["title"].astype(str).str.strip()
    years = pd.to_numeric(titles.str.extract(_YEAR, expand=False), errors="coerce").fillna(0)
    genres = [tuple(g for g in str(s).split("|") if g and g != "(no genres listed)") for s in frame["genres"]]
    return pd.DataFrame(
        {"title": titles.to_numpy(dtype=object), "year": years.to_numpy(np.int64), "genres": genres},
        index=pd.Index(ids, name="item_id"),
    )


def load_movielens_ratings(path: Path | str) -> Interactions:
    """`ratings.dat` (UserID::MovieID::Rating::Timestamp, no header) or `ratings.csv`
    (userId,movieId,rating,timestamp), told apart by the first line; movies.dat/.csv beside it is optional."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.readline()
    if not head:
        raise DataFormatError(path, "empty file")
    if not head.strip():
        raise DataFormatError(path, "blank first line", 1)
    is_dat = b"::" in head
    if is_dat:
        frame, source = _read_dat(path, _RATING_COLUMNS), _Source(path, first_line=1)
    else:
        source = _Source(path, first_line=2)
        frame = _read_csv(source, path, " separated by ','")
        _check_columns(frame, _RATING_COLUMNS, source)
    if frame.empty:
        raise source.error("empty file")
    return Interactions(
        user=_as_int64(frame["userId"], "userId", source),
        item=_as_int64(frame["movieId"], "movieId", source),
        timestamp=_as_int64(frame["timestamp"], "timestamp", source),
        rating=_as_float32(frame["rating"], "rating", source),
        name=path.parent.name or path.stem,
        item_features=_movies(path.parent, is_dat),
    )


# ---------------------------------------------------------------------------------------------------------
# Any CSV or Parquet log


@dataclass(frozen=True)
class ColumnMapping:
    """Which columns of a user's table hold what. rating=None: the log has no action values; timestamp=None:
    it has no time, and each user's events are taken in file order."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str | None = "timestamp"
    rating: str | None = None


def load_table(path: Path | str, columns: ColumnMapping = ColumnMapping()) -> Interactions:
    """A CSV (with a header) or Parquet log. Timestamps: unix seconds, datetimes or datetime strings."""
    path = Path(path)
    optional = [c for c in (columns.timestamp, columns.rating) if c]
    wanted = [columns.user, columns.item, *optional]
    if path.suffix.lower() in (".parquet", ".pq"):
        source = _Source(path, first_line=None)
        try:
            frame = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several unrelated types for a file that is not Parquet
            raise source.error(f"not a readable Parquet file ({e})") from e
    else:
        source = _Source(path, first_line=2)
        frame = _read_csv(source, path, " separated by ','")
    no_time = "; a log without time: --time-col none (ColumnMapping(timestamp=None))"
    _check_columns(frame, wanted, source, {columns.timestamp: no_time} if columns.timestamp else None)
    if frame.empty:
        raise source.error("no rows")
    return Interactions(
        user=_as_ids(frame[columns.user], columns.user, source),
        item=_as_ids(frame[columns.item], columns.item, source),
        timestamp=(
            _as_unix_seconds(frame[columns.timestamp], columns.timestamp, source)
            if columns.timestamp else np.zeros(len(frame), dtype=np.int64)
        ),
        rating=_as_float32(frame[columns.rating], columns.rating, source) if columns.rating else None,
        name=path.stem,
        timed=columns.timestamp is not None,
    )


# ---------------------------------------------------------------------------------------------------------
# A synthetic log with planted sequential structure


@dataclass(frozen=True)
class SyntheticConfig:
    num_users: int = 500
    num_items: int = 200
    min_len: int = 20
    max_len: int = 60
    follow_prob: float = 0.9  # chance that the next item is the successor of the current one
    # jumps (and first items) draw item i with weight (i + 1)^-popularity_exponent: 0 = uniform, ~1 = the
    # long tail of real catalogues, where most items are rarely seen
    popularity_exponent: float = 0.0
    timed: bool = True  # False: a log with no time, only the order of each user's events
    seed: int = 0
    start_time: int = 1_600_000_000  # unix seconds
    mean_gap_s: int = 3600


def synthetic(config: SyntheticConfig = SyntheticConfig()) -> Interactions:
    """A log that a sequential model can learn and a popularity model cannot.

    Items sit on one hidden random cycle. Each user starts at a random item; each next item is the
    current item's successor on the cycle with probability `follow_prob`, else a uniformly random item.
    Ratings are 4-5 on successor steps and 1-3 otherwise, so actions carry signal too.
    With `popularity_exponent` 0, item popularity is near uniform, so popularity scores HR@10 ~ chance =
    10 / num_items (5% by default); a model that learns the rule scores HR@10 >= follow_prob. Raw ids are
    1..num_users and 1..num_items.
    """
    rng = np.random.default_rng(config.seed)
    users, width = config.num_users, config.max_len
    cycle = rng.permutation(config.num_items)
    successor = np.empty(config.num_items, dtype=np.int64)
    successor[cycle] = np.roll(cycle, -1)

    lengths = rng.integers(config.min_len, config.max_len + 1, size=users)  # (U,)
    follow = rng.random((users, width)) < config.follow_prob  # (U, W)
    follow[:, 0] = False
    if config.popularity_exponent:
        weights = np.arange(1, config.num_items + 1, dtype=np.float64) ** -config.popularity_exponent
        jumps = rng.choice(config.num_items, size=(users, width), p=weights / weights.sum())  # (U, W)
    else:
        jumps = rng.integers(0, config.num_items, size=(users, width))
    items = np.empty((users, width), dtype=np.int64)
    items[:, 0] = jumps[:, 0]
    for t in range(1, width):
        items[:, t] = np.where(follow[:, t], successor[items[:, t - 1]], jumps[:, t])

    ratings = np.where(
        follow, rng.integers(4, 6, size=(users, width)), rng.integers(1, 4, size=(users, width))
    )
    gaps = 1 + rng.exponential(config.mean_gap_s, size=(users, width)).astype(np.int64)
    starts = config.start_time + rng.integers(0, 365 * 86400, size=users)
    timestamps = starts[:, None] + np.cumsum(gaps, axis=1)  # (U, W), strictly increasing per user

    valid = np.arange(width)[None, :] < lengths[:, None]  # (U, W)
    user_ids = np.broadcast_to(np.arange(1, users + 1)[:, None], (users, width))
    # a log is not sorted by user; one without time keeps each user's events in order
    order = rng.permutation(int(valid.sum())) if config.timed else np.arange(int(valid.sum()))
    return Interactions(
        user=user_ids[valid][order].astype(np.int64),
        item=(items[valid] + 1)[order],
        timestamp=timestamps[valid][order] if config.timed else np.zeros(int(valid.sum()), dtype=np.int64),
        rating=ratings[valid][order].astype(np.float32),
        name=f"synthetic-{config.seed}",
        timed=config.timed,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fetch the datasets genrec trains on out of the box.")
    parser.add_argument(
        "--fetch-ml100k", action="store_true", help=f"download ML-100K (inside {ML100K_WHEEL})"
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="cache folder (default $GENREC_DATA or ~/.cache/genrec)"
    )
    args = parser.parse_args(argv)
    if not args.fetch_ml100k:
        parser.error("nothing to do: pass --fetch-ml100k")
    print(fetch_ml100k(cache_dir(args.data_dir)))


if __name__ == "__main__":
    main()
