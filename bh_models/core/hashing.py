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
import stat
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from bh_models.core.jsonio import write_json

#: Folder of the hash cache, relative to the results directory (hidden, so the
#: audit and the reproducibility manifests skip it).
HASH_CACHE_DIRNAME = ".cache/sha256"

#: An entry is trusted only if the file was last modified at least this long
#: before the entry was written (covers coarse file-system clocks and NFS skew).
RACY_WINDOW_NS = 1_000_000_000

_ENTRY_FORMAT = 1


def sha256_file(*, path: Path) -> str:
    """SHA-256 of a file's bytes, streamed by ``hashlib.file_digest`` (constant memory).

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
    equally however they were written. Same form as ``bh_models.core.config.config_hash``.
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
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

    def as_list(self) -> list[int]:
        """The form stored in a cache entry."""
        return [self.size, self.mtime_ns, self.ctime_ns, self.inode, self.device]


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
        self._cache_root = os.fspath(self.cache_dir) if self.cache_dir is not None else ""
        self._real_folders: dict[str, str] = {}

    def _entry_path(self, real: str) -> str:
        key = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()
        # Two-level fan-out keeps folders small at 10^5-10^6 entries.
        return os.path.join(self._cache_root, key[:2], f"{key[2:]}.json")

    def _real_and_stat(self, path: str | os.PathLike) -> tuple[str, os.stat_result]:
        # realpath costs one lstat per path component; folders repeat across
        # thousands of files, so resolve each folder once and lstat only the file.
        absolute = os.path.abspath(os.fspath(path))
        st = os.lstat(absolute)
        if stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(absolute)
            return real, os.stat(real)
        folder, name = os.path.split(absolute)
        return os.path.join(self._real_folder(folder), name), st

    def _real_folder(self, folder: str) -> str:
        # realpath, memoised per folder and built from the parent's: one lstat
        # per new folder instead of one per path component.
        real = self._real_folders.get(folder)
        if real is None:
            parent, name = os.path.split(folder)
            if not name:  # the root
                real = folder
            elif stat.S_ISLNK(os.lstat(folder).st_mode):
                real = os.path.realpath(folder)
            else:
                real = os.path.join(self._real_folder(parent), name)
            self._real_folders[folder] = real
        return real

    def _cached(self, entry: str, real: str, stamp: FileStamp) -> str | None:
        try:
            with open(entry, encoding="utf-8") as fh:
                entry_mtime_ns = os.fstat(fh.fileno()).st_mtime_ns
                data = json.load(fh)
        except (OSError, ValueError):
            return None
        if (
            not isinstance(data, dict)
            or data.get("format") != _ENTRY_FORMAT
            or data.get("path") != real
            or data.get("stamp") != stamp.as_list()
            or stamp.mtime_ns + RACY_WINDOW_NS > entry_mtime_ns
        ):
            return None
        digest = data.get("sha256")
        return digest if isinstance(digest, str) and len(digest) == 64 else None

    def sha256(self, *, path: str | os.PathLike) -> str:
        """SHA-256 of ``path``, from the cache when its stamp is unchanged.

        Parameters
        ----------
        path : str or Path
            Existing file (a symlink is followed; the entry is keyed by the
            target's real path, so every spelling of a file shares one entry).

        Returns
        -------
        str
            Hex digest.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        IsADirectoryError
            If ``path`` is a folder (see :meth:`sha256_tree`).
        """
        real, st = self._real_and_stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(real)
        stamp = FileStamp.of(st)
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
                Path(entry),
                {
                    "format": _ENTRY_FORMAT,
                    "path": real,
                    "sha256": digest,
                    "stamp": stamp.as_list(),
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

    def sha256_path(self, *, path: str | os.PathLike) -> str | None:
        """SHA-256 of a file, tree hash of a folder, ``None`` if ``path`` does not exist."""
        try:
            try:
                return self.sha256(path=path)
            except IsADirectoryError:
                return self.sha256_tree(path=path)
        except FileNotFoundError:
            return None

    def sha256_many(
        self, *, paths: Iterable[str | os.PathLike], threads: int = 1, progress: bool = False
    ) -> dict[str | os.PathLike, str | None]:
        """Hash many files, in parallel threads.

        Parameters
        ----------
        paths : iterable of str or Path
            Files to hash (duplicates are hashed once).
        threads : int
            Worker threads. hashlib and file reads release the GIL, so threads
            help when files must really be read (large files, network storage).
            Cache hits are Python-bound (stat, read and parse a small JSON);
            extra threads, and worker processes, were measured slower than one
            thread for them on a 2-core machine.
        progress : bool
            Show a tqdm progress bar.

        Returns
        -------
        dict
            Each path, as given -> hex digest (tree hash for a folder), or
            ``None`` for a path that does not exist.
        """
        unique = list(dict.fromkeys(paths))  # kept as given: no pathlib cost on 10^5 paths

        def one(path: str | os.PathLike) -> str | None:
            return self.sha256_path(path=path)

        bar = dict(total=len(unique), desc="sha256", unit="file", disable=None if progress else True)
        if threads <= 1:
            digests = [one(p) for p in tqdm(unique, **bar)]
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                digests = list(tqdm(pool.map(one, unique), **bar))
        return dict(zip(unique, digests))

