"""SHA-256 of files, streamed, with a stat-keyed cache so each file is hashed once.

Why a cache
-----------
Every job's provenance record lists the sha256 of its inputs and outputs, and a
raw T1w or an upstream derivative is the input of several jobs. Hashing it again
for every consumer would read the cohort many times over. Instead, the first
hash of a file is stored as a small JSON entry keyed by the file's real path and
trusted while the file's stat stamp (size, mtime_ns, ctime_ns, inode, device) is
unchanged; the audit reuses the same entries.

Concurrency
-----------
Many parallel jobs (local cores or SLURM nodes sharing a file system) read and
write the cache at once. Each entry is its own file, written atomically
(temporary file + ``os.replace``), so there is no global lock: concurrent
writers of one entry write equivalent content and the last rename wins; a
reader sees either the old or the new entry, never half of one. A missing,
unreadable or foreign entry is simply a cache miss.

Racy entries
------------
A file rewritten within the same clock tick as it was hashed can keep its size
and mtime. As git does for its index, an entry is trusted only when the file's
mtime is older than the entry file itself by :data:`RACY_WINDOW_NS` (both clocks
are the file system's); otherwise the file is hashed again and the entry renewed.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from bh_models.jsonio import write_json

#: Folder of the hash cache, relative to the results directory (hidden, so the
#: audit and the reproducibility manifests skip it).
HASH_CACHE_DIRNAME = ".cache/sha256"

#: An entry is trusted only if the file was last modified at least this long
#: before the entry was written (covers coarse file-system clocks and NFS skew).
RACY_WINDOW_NS = 1_000_000_000

_CHUNK_BYTES = 1 << 20  # 1 MiB reads: large enough that hashlib releases the GIL
_ENTRY_FORMAT = 1


def sha256_file(*, path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (constant memory).

    Parameters
    ----------
    path : Path
        File to hash.

    Returns
    -------
    str
        Lower-case hex digest (64 characters).
    """
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def sha256_text(*, text: str) -> str:
    """SHA-256 of a UTF-8 string (hex), e.g. of a canonical JSON document."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def canonical_json_sha256(*, obj: object) -> str:
    """SHA-256 of the canonical JSON of ``obj`` (sorted keys, no whitespace).

    Key order and formatting never change the hash, so two equal configs hash
    equally however they were written.
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return sha256_text(text=text)


def hash_cache_dir(*, results_dir: Path) -> Path:
    """Folder of the hash cache of one results directory."""
    return Path(results_dir) / HASH_CACHE_DIRNAME


@dataclass(frozen=True)
class FileStamp:
    """What must stay equal for a cached hash to still describe a file."""

    size: int
    mtime_ns: int
    ctime_ns: int  # changes even when a writer restores mtime with `touch -d`
    inode: int
    device: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


class HashCache:
    """Hash files through per-file JSON cache entries.

    Parameters
    ----------
    cache_dir : Path or None
        Folder of the entries (see :func:`hash_cache_dir`). ``None`` disables the
        cache: every call hashes the file.
    rehash : bool
        Ignore existing entries (always hash) but still renew them; the audit's
        ``--rehash``.

    Attributes
    ----------
    hits, misses : int
        Counters of trusted entries and of files actually read (per instance).
    """

    def __init__(self, *, cache_dir: Path | None, rehash: bool = False) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.rehash = rehash
        self.hits = 0
        self.misses = 0
        self._count_lock = threading.Lock()  # counters are shared by sha256_many's threads

    def _entry_path(self, real: str) -> Path:
        assert self.cache_dir is not None
        key = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()
        # Two-level fan-out keeps folders small at 10^5-10^6 entries.
        return self.cache_dir / key[:2] / f"{key[2:]}.json"

    def _cached(self, entry: Path, real: str, stamp: FileStamp) -> str | None:
        try:
            with open(entry, encoding="utf-8") as fh:
                entry_mtime_ns = os.fstat(fh.fileno()).st_mtime_ns
                data = json.load(fh)
        except (OSError, ValueError):
            return None
        if (
            data.get("format") != _ENTRY_FORMAT
            or data.get("path") != real
            or FileStamp(*data.get("stamp", ())) != stamp
            or stamp.mtime_ns + RACY_WINDOW_NS > entry_mtime_ns
        ):
            return None
        digest = data.get("sha256")
        return digest if isinstance(digest, str) and len(digest) == 64 else None

    def sha256(self, *, path: Path) -> str:
        """SHA-256 of ``path``, from the cache when its stamp is unchanged.

        Parameters
        ----------
        path : Path
            Existing file.

        Returns
        -------
        str
            Hex digest.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        """
        real = os.path.realpath(path)
        stamp = FileStamp.of(os.stat(real))
        entry = self._entry_path(real) if self.cache_dir is not None else None
        if entry is not None and not self.rehash:
            digest = self._cached(entry, real, stamp)
            if digest is not None:
                with self._count_lock:
                    self.hits += 1
                return digest
        with self._count_lock:
            self.misses += 1
        digest = sha256_file(path=Path(real))
        # Only cache what we know we read: a file changing while we hashed it
        # gets a new stamp, and the next caller hashes it again.
        if entry is not None and FileStamp.of(os.stat(real)) == stamp:
            write_json(
                entry,
                {
                    "format": _ENTRY_FORMAT,
                    "path": real,
                    "sha256": digest,
                    "stamp": [stamp.size, stamp.mtime_ns, stamp.ctime_ns, stamp.inode, stamp.device],
                },
            )
        return digest

    def sha256_tree(self, *, path: Path) -> str:
        """SHA-256 of a folder: of the sorted lines ``<relative path>\\t<file sha256>``.

        Used when a rule's input or output is a whole folder. Hidden files are
        skipped (atomic-write temporaries); file hashes go through the cache.
        """
        root = Path(path)
        lines = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue
                file = Path(dirpath) / name
                lines.append(f"{file.relative_to(root).as_posix()}\t{self.sha256(path=file)}\n")
        return sha256_text(text="".join(sorted(lines)))

    def sha256_path(self, *, path: Path) -> str | None:
        """SHA-256 of a file, tree hash of a folder, ``None`` if ``path`` does not exist."""
        try:
            if os.path.isdir(path):
                return self.sha256_tree(path=path)
            return self.sha256(path=path)
        except FileNotFoundError:
            return None

    def sha256_many(
        self, *, paths: Iterable[Path], threads: int = 1, progress: bool = False
    ) -> dict[Path, str | None]:
        """Hash many files, in parallel threads.

        Parameters
        ----------
        paths : iterable of Path
            Files to hash (duplicates are hashed once).
        threads : int
            Worker threads. hashlib and file reads release the GIL, so threads
            help when files must really be read; cache hits are cheap anyway.
        progress : bool
            Show a tqdm progress bar.

        Returns
        -------
        dict
            Path -> hex digest (tree hash for a folder), or ``None`` for a path
            that does not exist.
        """
        unique = list(dict.fromkeys(Path(p) for p in paths))

        def one(path: Path) -> str | None:
            return self.sha256_path(path=path)

        bar = dict(total=len(unique), desc="sha256", unit="file", disable=None if progress else True)
        if threads <= 1:
            digests = [one(p) for p in tqdm(unique, **bar)]
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                digests = list(tqdm(pool.map(one, unique), **bar))
        return dict(zip(unique, digests))
