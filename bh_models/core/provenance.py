"""Provenance records per job and BIDS ``dataset_description.json`` files.

One JSON record per successful job, at
``<results_dir>/provenance/<rule>/<jobkey>.json``, holds what a user needs to
check later that a file still matches what produced it: the rule and its
wildcards, every input and output with its sha256, the parameters, the hash of
the whole config, the seed, the versions of the code and of the packages that
matter, the host, the SLURM job id, and the start and end times.

Paths in a record are portable, so a results tree can be moved or audited on
another machine:

* a file under a configured raw BIDS root is a BIDS URI,
  ``bids:<dataset>:sub-01/anat/sub-01_T1w.nii.gz``;
* any other file under the working directory is relative to it
  (``results/derivatives/bh-preproc/...``);
* anything else stays absolute.

The record also stores where the results directory and the BIDS roots were
(relative to the working directory when possible), which is what
:func:`resolve_recorded_path` needs to turn a recorded path back into a file.

Hashes go through :class:`bh_models.core.hashing.HashCache`, shared by all jobs of a
results directory, so an input consumed by many jobs is read once.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import re
import socket
import subprocess
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import bh_models
from bh_models.core.hashing import HashCache, canonical_json_sha256, hash_cache_dir
from bh_models.core.jsonio import write_json

#: Folder of the per-job records, relative to the results directory.
PROVENANCE_DIRNAME = "provenance"

#: Version of the record layout, bumped when fields change meaning.
RECORD_FORMAT = 1

#: Distributions whose versions change results (key: import name as users know it).
TRACKED_PACKAGES = {
    "bh_models": "bh-models",
    "snakemake": "snakemake",
    "nibabel": "nibabel",
    "nilearn": "nilearn",
    "antspyx": "antspyx",
    "deepbet": "deepbet",
    "lapy": "lapy",
    "torch": "torch",
    "numpy": "numpy",
    "pandas": "pandas",
    "nipype": "nipype",
    "scikit-learn": "scikit-learn",
}

PIPELINE_NAME = "bh_models"
BIDS_VERSION = "1.10.0"

_SAFE_LABEL = re.compile(r"[^A-Za-z0-9.-]+")


# --------------------------------------------------------------------------- code and environment


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """Installed versions of :data:`TRACKED_PACKAGES` (``"not installed"`` if absent).

    Cached per process: a job asks once, whatever the number of records it writes.
    """
    versions = {}
    for key, dist in TRACKED_PACKAGES.items():
        try:
            versions[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[key] = "not installed"
    return versions


def find_code_repository(*, start: Path | None = None) -> Path | None:
    """Root of the git working tree holding ``bh_models`` (``None`` if not in one).

    Parameters
    ----------
    start : Path, optional
        Where to start looking upwards; default: the ``bh_models`` package folder.
    """
    here = Path(start) if start is not None else Path(bh_models.__file__).resolve().parent
    for folder in (here, *here.parents):
        if (folder / ".git").exists():
            return folder
    return None


def _git(repo: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):  # git absent or hung
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _read_head_without_git(repo: Path) -> str | None:
    # Compute nodes may lack git; HEAD is plain text in a normal checkout.
    git_dir = repo / ".git"
    try:
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head if re.fullmatch(r"[0-9a-f]{40,64}", head) else None
        ref = head[5:]
        ref_file = git_dir / ref
        if ref_file.is_file():
            return ref_file.read_text().strip()
        for line in (git_dir / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        return None
    return None


@functools.lru_cache(maxsize=8)
def code_version(*, repo: Path | None = None) -> dict[str, Any]:
    """Git commit and dirty flag of the code, cheaply (cached per process).

    Parameters
    ----------
    repo : Path, optional
        Git working tree; default: the one holding ``bh_models``
        (:func:`find_code_repository`).

    Returns
    -------
    dict
        ``{"commit": <hex sha or "unknown">, "dirty": bool or None}``. ``dirty``
        is True when tracked files differ from the commit (or there is no
        commit yet), None when it cannot be told (no repository, no git).
    """
    repo = repo if repo is not None else find_code_repository()
    if repo is None:
        return {"commit": "unknown", "dirty": None}
    commit = _git(repo, "rev-parse", "--verify", "--quiet", "HEAD")
    if commit is None:
        commit = _read_head_without_git(repo)
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    if commit is None:
        return {"commit": "unknown", "dirty": True if status is not None else None}
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def utc_now_iso() -> str:
    """Current UTC time as ISO 8601 with seconds, for ``started``/``finished``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- paths


def _lexical_abspath(path: str | os.PathLike) -> str:
    # abspath, not realpath: a symlinked raw folder keeps the name the user gave it.
    return os.path.abspath(os.fspath(path))


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def portable_path(
    *, path: str | os.PathLike, workdir: Path, bids_roots: Mapping[str, Path] | None = None
) -> str:
    """The recorded form of a path: BIDS URI, workdir-relative, or absolute.

    Parameters
    ----------
    path : str or Path
        File or folder (relative paths are relative to ``workdir``).
    workdir : Path
        Working directory of the run (where Snakemake runs).
    bids_roots : mapping, optional
        Raw dataset name -> root folder of its BIDS tree.

    Returns
    -------
    str
        ``bids:<name>:<relative path>`` under a BIDS root (the deepest root
        wins), else a POSIX path relative to ``workdir`` when under it, else
        the absolute path.
    """
    workdir_abs = _lexical_abspath(workdir)
    absolute = os.path.normpath(os.path.join(workdir_abs, os.fspath(path)))
    best: tuple[int, str] | None = None
    for name, root in (bids_roots or {}).items():
        root_abs = os.path.normpath(os.path.join(workdir_abs, os.fspath(root)))
        if _is_within(absolute, root_abs) and (best is None or len(root_abs) > best[0]):
            rel = Path(os.path.relpath(absolute, root_abs)).as_posix()
            best = (len(root_abs), f"bids:{name}:{'' if rel == '.' else rel}")
    if best is not None:
        return best[1]
    if _is_within(absolute, workdir_abs):
        return Path(os.path.relpath(absolute, workdir_abs)).as_posix()
    return absolute


def recorded_path_resolver(
    *, workdir: Path, bids_roots: Mapping[str, Path] | None = None
) -> Callable[[str], str]:
    """A fast ``recorded path -> absolute path string`` function for one record's context.

    String-only (no pathlib) because the audit resolves hundreds of thousands
    of paths. See :func:`resolve_recorded_path` for the rules.
    """
    base = _lexical_abspath(workdir)
    roots = {name: os.path.join(base, os.fspath(root)) for name, root in (bids_roots or {}).items()}

    def resolve(recorded: str) -> str:
        if recorded.startswith("bids:"):
            _, name, rel = recorded.split(":", 2)
            return os.path.normpath(os.path.join(roots[name], rel))
        return os.path.normpath(os.path.join(base, recorded))

    return resolve


def resolve_recorded_path(
    *, recorded: str, workdir: Path, bids_roots: Mapping[str, Path] | None = None
) -> Path:
    """Inverse of :func:`portable_path`: the file a recorded path names now.

    Parameters
    ----------
    recorded : str
        Path as stored in a provenance record.
    workdir : Path
        Working directory to resolve relative paths against.
    bids_roots : mapping, optional
        Raw dataset name -> BIDS root, to resolve ``bids:`` URIs (relative
        roots are relative to ``workdir``).

    Returns
    -------
    Path
        Absolute, normalised path.

    Raises
    ------
    KeyError
        For a BIDS URI naming a dataset that ``bids_roots`` lacks.
    """
    return Path(recorded_path_resolver(workdir=workdir, bids_roots=bids_roots)(recorded))


def workdir_of(*, results_dir: Path, record: Mapping[str, Any]) -> Path:
    """Working directory of a record, found from where its results dir is now.

    The record stores the results directory relative to the working
    directory it ran in (e.g. ``results``); stripping that many trailing
    components from the current results path gives the working directory,
    so a moved or copied tree still resolves.
    """
    results_dir = Path(_lexical_abspath(results_dir))
    recorded = Path(record.get("results_dir", "results"))
    if recorded.is_absolute() or ".." in recorded.parts:
        # The results dir was outside the working directory: its own paths are
        # absolute in the record, and other relative paths refer to the cwd.
        return Path.cwd()
    depth = len(recorded.parts) if recorded != Path(".") else 0
    return results_dir.parents[depth - 1] if depth else results_dir


def job_key(*, wildcards: Mapping[str, Any]) -> str:
    """File-name-safe, deterministic key of a job from its wildcards.

    ``{"dataset": "ds1", "subject": "01"}`` -> ``dataset-ds1_subject-01``; no
    wildcards -> ``all``. Labels needing sanitising, or too long for a file
    name, get a short hash of the exact wildcards so keys never collide.
    """
    if not wildcards:
        return "all"
    items = sorted((str(k), str(v)) for k, v in wildcards.items())
    readable = "_".join(f"{k}-{v}" for k, v in items)
    safe = "_".join(f"{_SAFE_LABEL.sub('', k)}-{_SAFE_LABEL.sub('', v)}" for k, v in items)
    if safe == readable and len(safe) <= 150:
        return safe
    digest = hashlib.sha256(repr(items).encode("utf-8")).hexdigest()[:12]
    return f"{safe[:120]}_{digest}"


def _rule_folder(rule: str) -> str:
    # Snakemake rule names are identifiers; anything else is made safe and unique.
    if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", rule):
        return rule
    return f"{_SAFE_LABEL.sub('', rule)[:60]}_{hashlib.sha256(rule.encode('utf-8')).hexdigest()[:8]}"


def provenance_dir(*, results_dir: Path) -> Path:
    """Folder of the per-job provenance records of a results directory."""
    return Path(results_dir) / PROVENANCE_DIRNAME


def iter_records(*, results_dir: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every provenance record under a results directory, in path order.

    Yields
    ------
    (Path, dict)
        Record file and its content. Hidden files (atomic-write
        temporaries) are skipped.
    """
    root = os.fspath(provenance_dir(results_dir=results_dir))
    if not os.path.isdir(root):
        return
    # os.scandir, not pathlib: the audit reads 10^4-10^5 records.
    with os.scandir(root) as rules:
        rule_dirs = sorted(e.path for e in rules if e.is_dir() and not e.name.startswith("."))
    for rule_dir in rule_dirs:
        with os.scandir(rule_dir) as found:
            files = sorted(e.path for e in found if e.name.endswith(".json") and not e.name.startswith("."))
        for path in files:
            with open(path, encoding="utf-8") as fh:
                yield Path(path), json.load(fh)


# --------------------------------------------------------------------------- records


def _file_entries(
    files: Mapping[str, list[str]] | None,
    *,
    workdir: Path,
    bids_roots: Mapping[str, Path] | None,
    cache: HashCache,
) -> dict[str, list[dict[str, Any]]]:
    entries: dict[str, list[dict[str, Any]]] = {}
    for name, paths in sorted((files or {}).items()):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        entries[str(name)] = [
            {
                "path": portable_path(path=p, workdir=workdir, bids_roots=bids_roots),
                "sha256": cache.sha256_path(path=Path(workdir) / p),
            }
            for p in paths
        ]
    return entries


def record_job(
    *,
    results_dir: Path,
    rule: str,
    wildcards: dict,
    inputs: dict[str, list[str]],
    outputs: dict[str, list[str]],
    params: dict,
    config: dict,
    seed: int | None,
    started: str,
    finished: str,
    log: str | None,
    bids_roots: dict[str, Path] | None = None,
    workdir: Path | None = None,
    hash_cache: HashCache | None = None,
) -> Path:
    """Write the provenance record of one successful job.

    Parameters
    ----------
    results_dir : Path
        Results directory of the run (records go to ``provenance/<rule>/``).
    rule : str
        Snakemake rule name.
    wildcards : dict
        The job's wildcards (they name the record, see :func:`job_key`).
    inputs, outputs : dict of str -> list of str
        Named input and output files (or folders) as Snakemake lists them; a
        bare string counts as a one-item list.
    params : dict
        The rule's params, JSON-able.
    config : dict
        The whole workflow config; only its canonical-JSON sha256 is stored.
    seed : int or None
        Seed used by the job, if any.
    started, finished : str
        ISO 8601 times (see :func:`utc_now_iso`).
    log : str or None
        The job's log file.
    bids_roots : dict of str -> Path, optional
        Raw dataset name -> BIDS root; inputs under a root are stored as BIDS URIs.
    workdir : Path, optional
        Working directory relative paths refer to; default: the current one.
    hash_cache : HashCache, optional
        Hasher to use; default: the cache of ``results_dir``.

    Returns
    -------
    Path
        The record written, ``<results_dir>/provenance/<rule>/<jobkey>.json``.
    """
    workdir = Path(workdir) if workdir is not None else Path.cwd()
    results_dir = workdir / results_dir  # relative paths are relative to the workdir (absolute stay)
    cache = hash_cache if hash_cache is not None else HashCache(cache_dir=hash_cache_dir(results_dir=results_dir))
    key = job_key(wildcards=wildcards)
    record = {
        "format": RECORD_FORMAT,
        "rule": rule,
        "jobkey": key,
        "wildcards": {str(k): str(v) for k, v in (wildcards or {}).items()},
        "inputs": _file_entries(inputs, workdir=workdir, bids_roots=bids_roots, cache=cache),
        "outputs": _file_entries(outputs, workdir=workdir, bids_roots=bids_roots, cache=cache),
        "params": params or {},
        "config_sha256": canonical_json_sha256(obj=config or {}),
        "seed": seed,
        "code": {"name": PIPELINE_NAME, "version": bh_models.__version__, **code_version()},
        "software": package_versions(),
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started": started,
        "finished": finished,
        "log": None if log is None else portable_path(path=log, workdir=workdir, bids_roots=bids_roots),
        # Where things were, so that the audit can resolve the paths above.
        "results_dir": portable_path(path=results_dir, workdir=workdir),
        "bids_roots": {
            str(name): portable_path(path=root, workdir=workdir) for name, root in sorted((bids_roots or {}).items())
        },
    }
    return write_json(provenance_dir(results_dir=results_dir) / _rule_folder(rule) / f"{key}.json", record)


# --------------------------------------------------------------------------- dataset_description.json


def write_dataset_description(
    *,
    path: Path,
    name: str,
    source_datasets: list[str],
    pipeline_version: str,
    code_url: str,
    description: str | None = None,
    dataset_links: dict[str, str] | None = None,
) -> Path:
    """Write a BIDS-derivatives ``dataset_description.json``.

    Parameters
    ----------
    path : Path
        Output file (``<derivative root>/dataset_description.json``).
    name : str
        Name of the derivative dataset, e.g. ``"bh-preproc"``.
    source_datasets : list of str
        URL, DOI (``doi:...``) or BIDS URI (``bids:<name>``) of each source
        dataset, in the order given.
    pipeline_version : str
        Version of ``bh_models`` that produced the data.
    code_url : str
        Where the code lives.
    description : str, optional
        One-line description of what the pipeline did (GeneratedBy.Description).
    dataset_links : dict, optional
        BIDS ``DatasetLinks``: name -> URI, so ``bids:<name>:...`` URIs in
        provenance records resolve.

    Returns
    -------
    Path
        ``path``. Content depends only on the arguments and the git state, so
        two runs of the same checkout write identical bytes.
    """
    code = code_version()
    generated_by: dict[str, Any] = {
        "Name": PIPELINE_NAME,
        "Version": pipeline_version,
        "CodeURL": code_url,
        "Commit": code["commit"],
        "Dirty": code["dirty"],
    }
    if description:
        generated_by["Description"] = description
    sources = []
    for source in source_datasets:
        source = str(source)
        sources.append({"DOI": source} if source.lower().startswith("doi:") else {"URL": source})
    content: dict[str, Any] = {
        "Name": name,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        "SourceDatasets": sources,
    }
    if dataset_links:
        content["DatasetLinks"] = dict(dataset_links)
    return write_json(path, content)


def code_url() -> str:
    """GeneratedBy.CodeURL: the checkout's ``origin`` remote, else its local path."""
    repo = find_code_repository()
    if repo is None:
        return "unknown"
    return _git(repo, "remote", "get-url", "origin") or repo.resolve().as_uri()


def derivative_description(
    *, source: Path, out_description: Path, name: str, dataset: str, threads: int = 1
) -> dict[str, Any]:
    """Step function: ``dataset_description.json`` of one derivative dataset.

    Parameters
    ----------
    source : Path
        The raw dataset's ``dataset_description.json`` (checked readable).
    out_description : Path
        ``<results>/derivatives/<name>/<dataset>/dataset_description.json``.
    name : str
        Derivative pipeline name, e.g. ``"bh-preproc"``.
    dataset : str
        Raw dataset name from the config; the source is linked as ``bids:<dataset>``.
    """
    del threads
    from bh_models.core.errors import BHInputError

    try:
        raw = json.loads(Path(source).read_text())
    except (OSError, ValueError) as err:
        raise BHInputError(source, f"is not readable JSON ({err})",
                           "write a valid BIDS dataset_description.json at the dataset root") from err
    link = portable_path(path=Path(source).parent, workdir=Path.cwd())
    write_dataset_description(
        path=Path(out_description), name=f"{name} ({raw.get('Name', dataset)})",
        source_datasets=[f"bids:{dataset}"], pipeline_version=bh_models.__version__, code_url=code_url(),
        description="Brain Harmony preprocessing: skull-stripping, N4, MNI registration, "
                    "Schaefer-400 parcel time series",
        dataset_links={dataset: link},
    )
    return {"dataset": dataset}
