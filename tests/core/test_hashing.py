"""Tests of bh_models.core.hashing: streamed sha256 and the stat-keyed hash cache."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from bh_models.core.hashing import (
    HashCache,
    canonical_json_sha256,
    hash_cache_dir,
    sha256_file,
)

HOUR_NS = 3600 * 10**9


def _write(path: Path, data: bytes, *, age_ns: int = HOUR_NS) -> Path:
    """Write ``data`` and date the file ``age_ns`` in the past (so cache entries are not racy)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    past = path.stat().st_mtime_ns - age_ns
    os.utime(path, ns=(past, past))
    return path


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*/*.json"))


def test_sha256_file_streams_large_files_exactly(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, size=3 * (1 << 20) + 17, dtype=np.uint8).tobytes()
    path = _write(tmp_path / "big.bin", data)
    assert sha256_file(path=path) == hashlib.sha256(data).hexdigest()


def test_canonical_json_hash_ignores_key_order_not_values():
    a = canonical_json_sha256(obj={"seed": 1, "atlas": {"networks": 7, "parcels": 400}})
    b = canonical_json_sha256(obj={"atlas": {"parcels": 400, "networks": 7}, "seed": 1})
    c = canonical_json_sha256(obj={"atlas": {"parcels": 400, "networks": 17}, "seed": 1})
    assert a == b != c


def test_canonical_json_hash_matches_config_module():
    from bh_models.core import config
    obj = {"datasets": {"siteA": {"bids_root": "demo_data/siteA"}}, "seed": 42, "name": "Mölder"}
    assert canonical_json_sha256(obj=obj) == config.config_hash(obj)


def test_cache_hashes_each_file_once(tmp_path):
    path = _write(tmp_path / "raw" / "sub-01_T1w.nii.gz", b"t1w bytes")
    cache = HashCache(cache_dir=hash_cache_dir(results_dir=tmp_path / "results"))
    first = cache.sha256(path=path)
    second = cache.sha256(path=path)
    assert first == second == hashlib.sha256(b"t1w bytes").hexdigest()
    assert (cache.misses, cache.hits) == (1, 1)
    # A second process (new instance) trusts the same entry.
    other = HashCache(cache_dir=cache.cache_dir)
    assert other.sha256(path=path) == first and other.hits == 1
    entry = json.loads(_entries(cache.cache_dir)[0].read_text())
    assert entry["path"] == os.path.realpath(path) and entry["sha256"] == first


def test_cache_detects_same_size_change_even_with_restored_mtime(tmp_path):
    path = _write(tmp_path / "a.tsv", b"0123456789")
    cache = HashCache(cache_dir=tmp_path / "cache")
    before = cache.sha256(path=path)
    mtime = path.stat().st_mtime_ns
    path.write_bytes(b"0123456780")  # same size
    os.utime(path, ns=(mtime, mtime))  # and the old mtime: only ctime tells
    after = cache.sha256(path=path)
    assert after == hashlib.sha256(b"0123456780").hexdigest() != before
    assert cache.hits == 0


def test_racy_entry_is_not_trusted(tmp_path):
    path = _write(tmp_path / "fresh.npy", b"just written", age_ns=0)
    cache = HashCache(cache_dir=tmp_path / "cache")
    cache.sha256(path=path)
    cache.sha256(path=path)
    # Written in the same second as its entry: a rewrite could keep its stamp, so re-read.
    assert (cache.hits, cache.misses) == (0, 2)


def test_rehash_ignores_entries_and_renews_them(tmp_path):
    path = _write(tmp_path / "x.bin", b"payload")
    cache_dir = tmp_path / "cache"
    HashCache(cache_dir=cache_dir).sha256(path=path)
    (entry,) = _entries(cache_dir)
    forged = json.loads(entry.read_text()) | {"sha256": "0" * 64}
    entry.write_text(json.dumps(forged))
    os.utime(entry, ns=(path.stat().st_mtime_ns + HOUR_NS,) * 2)
    assert HashCache(cache_dir=cache_dir).sha256(path=path) == "0" * 64  # the cache is trusted...
    truth = hashlib.sha256(b"payload").hexdigest()
    assert HashCache(cache_dir=cache_dir, rehash=True).sha256(path=path) == truth  # ...unless told not to
    assert json.loads(entry.read_text())["sha256"] == truth


def test_corrupt_or_foreign_entries_are_misses(tmp_path):
    path = _write(tmp_path / "x.bin", b"payload")
    cache_dir = tmp_path / "cache"
    HashCache(cache_dir=cache_dir).sha256(path=path)
    (entry,) = _entries(cache_dir)
    entry.write_text("{half a json")
    cache = HashCache(cache_dir=cache_dir)
    assert cache.sha256(path=path) == hashlib.sha256(b"payload").hexdigest() and cache.misses == 1


def test_without_cache_dir_nothing_is_written(tmp_path):
    path = _write(tmp_path / "x.bin", b"payload")
    cache = HashCache(cache_dir=None)
    cache.sha256(path=path)
    cache.sha256(path=path)
    assert cache.misses == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_missing_file_raises_and_many_reports_none(tmp_path):
    cache = HashCache(cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError):
        cache.sha256(path=tmp_path / "nope")
    present = _write(tmp_path / "yes", b"1")
    got = cache.sha256_many(paths=[present, tmp_path / "nope", present], threads=2)
    assert got == {present: hashlib.sha256(b"1").hexdigest(), tmp_path / "nope": None}


def test_tree_hash_follows_content_and_names_not_order(tmp_path):
    cache = HashCache(cache_dir=tmp_path / "cache")
    _write(tmp_path / "a" / "x.txt", b"x")
    _write(tmp_path / "a" / "sub" / "y.txt", b"y")
    _write(tmp_path / "b" / "sub" / "y.txt", b"y")
    _write(tmp_path / "b" / "x.txt", b"x")
    (tmp_path / "b" / ".x.txt.tmp").write_bytes(b"temporary")  # hidden: ignored
    assert cache.sha256_path(path=tmp_path / "a") == cache.sha256_path(path=tmp_path / "b")
    _write(tmp_path / "b" / "x.txt", b"z")
    assert cache.sha256_path(path=tmp_path / "a") != cache.sha256_path(path=tmp_path / "b")


def test_concurrent_writers_share_entries_safely(tmp_path):
    files = [_write(tmp_path / "data" / f"f{i}.bin", bytes([i]) * (1000 + i)) for i in range(40)]
    cache_dir = tmp_path / "cache"

    def hash_all(_: int) -> list[str]:
        # One cache object per worker, as separate jobs would have.
        cache = HashCache(cache_dir=cache_dir)
        return [cache.sha256(path=f) for f in files]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(hash_all, range(8)))
    truth = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert all(r == truth for r in results)
    entries = _entries(cache_dir)
    assert len(entries) == len(files)
    assert all(json.loads(e.read_text())["sha256"] in truth for e in entries)
    assert not list(cache_dir.glob("*/.*"))  # no temporaries left behind


def test_symlinked_spellings_share_one_entry(tmp_path):
    target = _write(tmp_path / "raw" / "ds1" / "sub-01_T1w.nii.gz", b"t1w")
    (tmp_path / "link_dir").symlink_to(tmp_path / "raw")
    (tmp_path / "link_file.nii.gz").symlink_to(target)
    cache = HashCache(cache_dir=tmp_path / "cache")
    digests = {
        cache.sha256(path=p)
        for p in (target, tmp_path / "link_dir" / "ds1" / "sub-01_T1w.nii.gz", tmp_path / "link_file.nii.gz")
    }
    assert digests == {hashlib.sha256(b"t1w").hexdigest()}
    assert (cache.misses, cache.hits) == (1, 2) and len(_entries(tmp_path / "cache")) == 1
