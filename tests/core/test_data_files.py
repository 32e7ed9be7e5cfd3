"""The reference files shipped in bh_models/data match their recorded checksums."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.conftest import REPO

DATA = REPO / "bh_models" / "data"


def _sums() -> list[tuple[Path, str]]:
    entries = []
    for sums in sorted(DATA.glob("*/SHA256SUMS")):
        for line in sums.read_text().splitlines():
            if line.strip():
                digest, name = line.split(maxsplit=1)
                entries.append((sums.parent / name.lstrip("*"), digest))
    return entries


def test_every_shipped_file_is_listed():
    listed = {path for path, _ in _sums()}
    shipped = {p for p in DATA.glob("*/*") if p.name != "SHA256SUMS"}
    assert len(shipped) >= 12, f"no reference files found under {DATA}"
    assert shipped == listed


@pytest.mark.parametrize("path,digest", _sums(), ids=lambda v: v.name if isinstance(v, Path) else "")
def test_checksum(path, digest):
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
