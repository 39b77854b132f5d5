"""MovieLens-100K: fetch the RecBole wheel that packages it, read the atomic files out of the zip, parse.

The data is never committed (its licence forbids redistribution): the wheel is downloaded with the
ordinary package client into a cache directory outside git, and the three files are read straight out
of the zip (RecBole itself is never installed). Their SHA-256 digests are checked so a changed upstream
file cannot silently change the benchmark.

Atomic files (RecBole's format) are tab-separated with a typed header, e.g. `user_id:token`.
Types used here: `token` (a string), `float`, `token_seq` (space-separated tokens).
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "recbole==1.2.1"
WHEEL_FILENAME = "recbole-1.2.1-py3-none-any.whl"
WHEEL_MEMBER_DIR = "recbole/dataset_example/ml-100k/"
DATASET_NAME = "ml-100k"
# SHA-256 of the three atomic files inside recbole-1.2.1 (GroupLens' MovieLens-100K as RecBole packs it).
SHA256 = {
    "inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
KNOWN_TYPES = ("token", "float", "token_seq")
# Columns each file must have (more are allowed and ignored).
REQUIRED = {
    "inter": ("user_id", "item_id", "rating", "timestamp"),
    "item": ("item_id", "movie_title", "release_year", "class"),
    "user": ("user_id", "age", "gender", "occupation"),
}


class DataError(ValueError):
    """The data files are missing, corrupt or not in the expected format."""


@dataclass(frozen=True)
class Ratings:
    """n ratings, column-oriented, in file order."""

    user_ids: np.ndarray  # [n] int64 > 0
    item_ids: np.ndarray  # [n] int64 > 0
    ratings: np.ndarray  # [n] float32 (1..5 in MovieLens)
    timestamps: np.ndarray  # [n] int64, seconds since the epoch


@dataclass(frozen=True)
class Movie:
    item_id: int
    title: str
    year: str  # as in the file; may be empty
    genres: tuple[str, ...]


@dataclass(frozen=True)
class UserInfo:
    user_id: int
    age: int
    gender: str
    occupation: str


@dataclass(frozen=True)
class MovieLens:
    ratings: Ratings
    movies: tuple[Movie, ...]  # sorted by item_id
    users: dict[int, UserInfo]
    digests: dict[str, str]  # file kind -> SHA-256 of the bytes read


def fetch_wheel(cache_dir: str | Path) -> Path:
    """Download the wheel (no dependencies, no install) unless it is already in cache_dir."""
    cache_dir = Path(cache_dir)
    wheel = cache_dir / WHEEL_FILENAME
    if wheel.is_file():
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s into %s", WHEEL_REQUIREMENT, cache_dir)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        WHEEL_REQUIREMENT,
        "-d",
        str(cache_dir),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not wheel.is_file():
        raise DataError(f"could not download {WHEEL_REQUIREMENT}: {result.stderr.strip()[-500:]}")
    return wheel


def load_from_wheel(wheel: str | Path) -> MovieLens:
    """Read and verify ml-100k.{inter,item,user} from the RecBole wheel."""
    wheel = Path(wheel)
    try:
        with zipfile.ZipFile(wheel) as archive:
            blobs = {}
            for kind in SHA256:
                member = f"{WHEEL_MEMBER_DIR}{DATASET_NAME}.{kind}"
                try:
                    blobs[kind] = archive.read(member)
                except KeyError:
                    raise DataError(f"{wheel}: has no {member}") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{wheel}: not a readable wheel: {exc}") from exc
    for kind, blob in blobs.items():
        digest = hashlib.sha256(blob).hexdigest()
        if digest != SHA256[kind]:
            raise DataError(
                f"{wheel}: {DATASET_NAME}.{kind} has SHA-256 {digest}, expected {SHA256[kind]}: "
                "the file changed upstream or the download is corrupt"
            )
    return parse_files(blobs)


def load_from_dir(directory: str | Path, name: str) -> MovieLens:
    """Read `<name>.{inter,item,user}` from a directory (no digest check: for fixtures and local copies)."""
    blobs = {}
    for kind in REQUIRED:
        path = Path(directory) / f"{name}.{kind}"
        if not path.is_file():
            raise DataError(f"missing data file {path}")
        blobs[kind] = path.read_bytes()
    return parse_files(blobs)


def parse_files(blobs: dict[str, bytes]) -> MovieLens:
    tables = {kind: parse_atomic(blobs[kind].decode("utf-8"), f"{kind} file") for kind in REQUIRED}
    for kind, table in tables.items():
        missing = [c for c in REQUIRED[kind] if c not in table]
        if missing:
            raise DataError(f"{kind} file lacks column(s) {', '.join(missing)}")
    inter, item, user = tables["inter"], tables["item"], tables["user"]
    ratings = Ratings(
        user_ids=_positive_ids(inter["user_id"], "inter file user_id"),
        item_ids=_positive_ids(inter["item_id"], "inter file item_id"),
        ratings=np.asarray(inter["rating"], dtype=np.float32),
        timestamps=np.asarray(inter["timestamp"], dtype=np.int64),
    )
    item_ids = _positive_ids(item["item_id"], "item file item_id")
    movies = tuple(
        sorted(
            (
                Movie(
                    int(i),
                    _text(title),
                    _text(year),
                    tuple(genres) if isinstance(genres, list) else (genres,),
                )
                for i, title, year, genres in zip(
                    item_ids, item["movie_title"], item["release_year"], item["class"], strict=True
                )
            ),
            key=lambda m: m.item_id,
        )
    )
    if len({m.item_id for m in movies}) != len(movies):
        raise DataError("item file lists an item_id twice")
    user_ids = _positive_ids(user["user_id"], "user file user_id")
    users = {}
    for i, (uid, age) in enumerate(zip(user_ids, user["age"], strict=True)):
        if not age.isdigit():
            raise DataError(f"user file row {i + 1}: age {age!r} is not a whole number")
        users[int(uid)] = UserInfo(int(uid), int(age), user["gender"][i], user["occupation"][i])
    unknown_items = np.setdiff1d(ratings.item_ids, item_ids)
    if unknown_items.size:
        raise DataError(f"inter file rates item(s) missing from the item file, e.g. {int(unknown_items[0])}")
    digests = {kind: hashlib.sha256(blob).hexdigest() for kind, blob in blobs.items()}
    return MovieLens(ratings=ratings, movies=movies, users=users, digests=digests)


def parse_atomic(text: str, where: str) -> dict[str, list]:
    """One atomic file -> {column: values}; float columns become floats, token_seq columns lists."""
    lines = text.splitlines()
    if not lines:
        raise DataError(f"{where} is empty")
    names, types = [], []
    for field in lines[0].split("\t"):
        name, sep, kind = field.partition(":")
        if not sep or not name or kind not in KNOWN_TYPES:
            raise DataError(f"{where}: header field {field!r} is not NAME:TYPE with TYPE in {KNOWN_TYPES}")
        names.append(name)
        types.append(kind)
    columns: dict[str, list] = {name: [] for name in names}
    for number, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        values = line.split("\t")
        if len(values) != len(names):
            raise DataError(f"{where} line {number}: {len(values)} fields, the header has {len(names)}")
        for name, kind, value in zip(names, types, values, strict=True):
            if kind == "float":
                try:
                    columns[name].append(float(value))
                except ValueError:
                    raise DataError(f"{where} line {number}: {name}={value!r} is not a number") from None
            elif kind == "token_seq":
                columns[name].append(value.split())
            else:
                columns[name].append(value)
    return columns


def _text(value: str | list[str]) -> str:
    """A token as is, a token_seq joined back with single spaces (titles are token_seq in RecBole)."""
    return " ".join(value) if isinstance(value, list) else value


def _positive_ids(tokens: list[str], where: str) -> np.ndarray:
    for i, token in enumerate(tokens):
        if not token.isdigit() or int(token) == 0:
            raise DataError(f"{where} row {i + 1}: {token!r} is not an id > 0")
    return np.asarray([int(t) for t in tokens], dtype=np.int64)
