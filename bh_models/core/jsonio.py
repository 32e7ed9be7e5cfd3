"""Deterministic JSON and TSV writing: same content, same bytes."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def _default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean(obj: Any) -> Any:
    # JSON has no NaN: write null so every reader agrees.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    """Serialise with sorted keys and a trailing newline (byte-stable)."""
    return json.dumps(_clean(obj), indent=2, sort_keys=True, default=_default) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` atomically: a crash never leaves a half-written file."""
    path = Path(path)
    atomic_write_text(path, dumps(obj))
    return path


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tsv(frame: Any, path: str | os.PathLike, **to_csv: Any) -> Path:
    """Write a pandas DataFrame as TSV atomically (``index=False``, "\n" line ends unless given)."""
    path = Path(path)
    atomic_write_text(path, frame.to_csv(sep="\t", index=False, **{"lineterminator": "\n", **to_csv}))
    return path


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of a data file: same name, extension replaced by .json."""
    path = Path(path)
    name = path.name
    for ext in (".nii.gz", ".tsv.gz", ".nii", ".tsv", ".npy", ".png", ".csv", ".h5", ".mat"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".json")
    return path.with_name(path.stem + ".json")
