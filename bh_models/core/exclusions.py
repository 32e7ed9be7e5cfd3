"""Exclusion records: which subject failed which step, on which file, and why.

A bad subject fails its own jobs only (the cohort goes on with
``--keep-going``). The step runner turns the ``BHInputError`` of such a job
into one small JSON record, ``<results_dir>/exclusions/<dataset>/sub-<subject>/
<rule>_<file hash>.json``; one file per failure means parallel jobs never write
the same file, so no lock is needed. :func:`exclusion_table` gathers them into
the cohort's exclusion table for the report.

Records hold no time or host, so two runs that fail alike write the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pandas as pd

from bh_models.core.jsonio import atomic_write_text, read_json, write_json

#: Folder of the records, relative to the results directory (the audit skips it).
EXCLUSIONS_DIRNAME = "exclusions"

EXCLUSION_COLUMNS = ["dataset", "subject", "rule", "file", "reason"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _label(text: str) -> str:
    # Labels come from user data: keep them from escaping the folder or
    # colliding once sanitised.
    safe = _UNSAFE.sub("", str(text)).lstrip(".")
    if safe == str(text) and safe:
        return safe
    return f"{safe[:60]}{'_' if safe else ''}{hashlib.sha256(str(text).encode()).hexdigest()[:8]}"


def _shown_file(file: str | os.PathLike) -> str:
    # Relative to the working directory when inside it: the table must not
    # depend on where a run's folder was.
    absolute = os.path.abspath(os.fspath(file))
    cwd = os.getcwd()
    if absolute.startswith(cwd.rstrip(os.sep) + os.sep):
        return Path(os.path.relpath(absolute, cwd)).as_posix()
    return os.fspath(file)


def _subject_dir(results_dir: Path, dataset: str, subject: str) -> Path:
    subject = str(subject).removeprefix("sub-")
    return Path(results_dir) / EXCLUSIONS_DIRNAME / _label(dataset) / f"sub-{_label(subject)}"


def write_exclusion(
    *, results_dir: Path, dataset: str, subject: str, rule: str, reason: str, file: str | os.PathLike
) -> Path:
    """Record that a subject's job failed on a bad input.

    Parameters
    ----------
    results_dir : Path
        Results directory of the run.
    dataset : str
        Raw dataset name from the config.
    subject : str
        Subject label, with or without ``sub-``.
    rule : str
        Rule whose job failed.
    reason : str
        What is wrong and how to fix it (the ``BHInputError`` message).
    file : str or Path
        The offending file.

    Returns
    -------
    Path
        The record written. Writing the same failure again overwrites it.
    """
    shown = _shown_file(file)
    name = f"{_label(rule)}_{hashlib.sha256(shown.encode()).hexdigest()[:12]}.json"
    record = {
        "dataset": str(dataset),
        "subject": str(subject).removeprefix("sub-"),
        "rule": str(rule),
        "file": shown,
        "reason": str(reason),
    }
    return write_json(_subject_dir(results_dir, dataset, subject) / name, record)


def clear_exclusions(*, results_dir: Path, dataset: str, subject: str, rule: str) -> int:
    """Remove a subject's records for one rule, e.g. after the job succeeded on fixed data.

    Parameters
    ----------
    results_dir, dataset, subject, rule
        As in :func:`write_exclusion`.

    Returns
    -------
    int
        Number of records removed.
    """
    folder = _subject_dir(results_dir, dataset, subject)
    removed = 0
    for path in sorted(folder.glob("[!.]*.json")):
        # Compare the recorded rule, not the file name: sanitised names may share prefixes.
        if read_json(path).get("rule") == str(rule):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def exclusion_table(*, results_dir: Path, out_tsv: Path | None = None) -> pd.DataFrame:
    """Gather every exclusion record of a run into one table.

    Parameters
    ----------
    results_dir : Path
        Results directory of the run.
    out_tsv : Path, optional
        Where to write the table (header only when nothing was excluded).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`EXCLUSION_COLUMNS`, sorted by dataset, subject, rule,
        file, reason, so the same failures always give the same bytes.
    """
    root = Path(results_dir) / EXCLUSIONS_DIRNAME
    records = [read_json(p) for p in sorted(root.glob("*/*/[!.]*.json"))] if root.is_dir() else []
    table = pd.DataFrame(
        [{col: str(rec.get(col, "")) for col in EXCLUSION_COLUMNS} for rec in records],
        columns=EXCLUSION_COLUMNS,
    )
    table = table.sort_values(EXCLUSION_COLUMNS, kind="stable").reset_index(drop=True)
    if out_tsv is not None:
        atomic_write_text(Path(out_tsv), table.to_csv(sep="\t", index=False))
    return table


def failed_subjects(*, results_dir: Path) -> dict[str, set[str]]:
    """Subjects with an exclusion record, per dataset: the cohort plan leaves them out.

    A rerun of the same command then completes every cohort-level step
    without them; deleting a subject's records (after fixing its data)
    brings it back.
    """
    root = Path(results_dir) / EXCLUSIONS_DIRNAME
    failed: dict[str, set[str]] = {}
    if root.is_dir():
        for path in sorted(root.glob("*/*/[!.]*.json")):
            record = read_json(path)
            failed.setdefault(record["dataset"], set()).add(record["subject"])
    return failed


def write_exclusion_table(*, results_dir: Path, out_tsv: Path, threads: int = 1) -> dict[str, int]:
    """Step function: the cohort's exclusion table (header only when nobody failed)."""
    del threads
    table = exclusion_table(results_dir=Path(results_dir), out_tsv=Path(out_tsv))
    return {"n_records": int(len(table)), "n_subjects": int(table[["dataset", "subject"]].drop_duplicates().shape[0])}
