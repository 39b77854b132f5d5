"""Parsing the MovieLens atomic files (on a synthetic fixture in the same format) and the wheel reader."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from training import data as data_mod
from training.data import DataError, load_from_dir, load_from_wheel, parse_atomic

FIXTURE = Path(__file__).parents[1] / "fixtures" / "synthetic"


def test_fixture_parses_into_typed_columns():
    d = load_from_dir(FIXTURE, "synth")
    assert len(d.ratings.user_ids) == 282
    assert d.ratings.user_ids.dtype == np.int64 and d.ratings.ratings.dtype == np.float32
    assert d.ratings.timestamps[0] == 880001074 and d.ratings.ratings[0] == 5.0
    assert [m.item_id for m in d.movies] == list(range(1, 41))
    assert d.movies[0].title == "Synthetic Movie 1" and d.movies[0].genres == ("Action", "Test")
    assert d.movies[39].year == ""  # empty field kept as empty, not dropped
    assert d.users[3].age == 21 and d.users[3].gender == "F" and d.users[3].occupation == "student"


def test_parse_atomic_types_and_sequences():
    cols = parse_atomic("a:token\tb:float\tc:token_seq\nx\t1.5\tp q\n\ny\t2\t\n", "t")
    assert cols == {"a": ["x", "y"], "b": [1.5, 2.0], "c": [["p", "q"], []]}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("a:token\tb\n", "NAME:TYPE"),
        ("a:token\tb:blob\n", "NAME:TYPE"),
        ("a:token\tb:float\nx\n", "line 2: 1 fields"),
        ("a:token\tb:float\nx\tnope\n", "line 2: b='nope' is not a number"),
    ],
)
def test_parse_atomic_rejects_malformed_files(text, message):
    with pytest.raises(DataError, match=message):
        parse_atomic(text, "t")


def _blobs():
    return {kind: (FIXTURE / f"synth.{kind}").read_bytes() for kind in ("inter", "item", "user")}


def test_bad_ids_and_unknown_items_are_rejected():
    blobs = _blobs()
    bad = dict(blobs, inter=blobs["inter"].replace(b"\n1\t1\t5", b"\n0\t1\t5", 1))
    with pytest.raises(DataError, match="inter file user_id row 1: '0' is not an id > 0"):
        data_mod.parse_files(bad)
    unknown = dict(blobs, inter=blobs["inter"] + b"1\t99\t4\t890000000\n")
    with pytest.raises(DataError, match=r"missing from the item file, e\.g\. 99"):
        data_mod.parse_files(unknown)
    no_column = dict(blobs, user=b"user_id:token\tage:token\n1\t20\n")
    with pytest.raises(DataError, match="user file lacks column"):
        data_mod.parse_files(no_column)


def _fake_wheel(path: Path, blobs: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for kind, blob in blobs.items():
            z.writestr(f"{data_mod.WHEEL_MEMBER_DIR}{data_mod.DATASET_NAME}.{kind}", blob)
    return path


def test_wheel_members_are_read_and_digests_verified(tmp_path, monkeypatch):
    blobs = _blobs()
    monkeypatch.setattr(data_mod, "SHA256", {k: hashlib.sha256(b).hexdigest() for k, b in blobs.items()})
    d = load_from_wheel(_fake_wheel(tmp_path / "ok.whl", blobs))
    assert len(d.movies) == 40 and d.digests == data_mod.SHA256

    tampered = dict(blobs, inter=blobs["inter"].replace(b"\t5\t", b"\t1\t", 1))
    with pytest.raises(DataError, match=r"ml-100k\.inter has SHA-256 .* expected"):
        load_from_wheel(_fake_wheel(tmp_path / "bad.whl", tampered))


def test_wheel_without_the_dataset_or_not_a_zip(tmp_path):
    with pytest.raises(DataError, match=r"has no recbole/dataset_example/ml-100k/ml-100k\.inter"):
        load_from_wheel(_fake_wheel(tmp_path / "empty.whl", {}))
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable wheel"):
        load_from_wheel(junk)


def test_real_digests_are_pinned():
    assert set(data_mod.SHA256) == {"inter", "item", "user"}
    assert all(len(v) == 64 for v in data_mod.SHA256.values())


def test_fetch_wheel_uses_the_cache(tmp_path, monkeypatch):
    (tmp_path / data_mod.WHEEL_FILENAME).write_bytes(b"cached")

    def no_network(*args, **kwargs):
        raise AssertionError("must not download when the wheel is cached")

    monkeypatch.setattr(data_mod.subprocess, "run", no_network)
    assert data_mod.fetch_wheel(tmp_path) == tmp_path / data_mod.WHEEL_FILENAME
