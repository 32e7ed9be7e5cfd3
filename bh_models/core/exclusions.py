"""Exclusion records: which unit (subject, session or run) failed which step, on which file, and why.

A bad subject or run fails its own unit only: the batch job that meets it
(:mod:`bh_models.core.batches`) turns the ``BHInputError`` into one small JSON
record, ``<results_dir>/exclusions/<dataset>/sub-<subject>/<rule>_<unit hash>.json``,
lists the unit as ``excluded`` in its manifest, and goes on with the other
units. One file per failure means parallel jobs never write the same file, so
no lock is needed.

A record also holds the sha256 of the unit's inputs and of its parameters: a
later run of the batch skips the unit while both are unchanged (it would fail
the same way) and retries it as soon as the data or the settings change. A
unit that then succeeds has its record removed.

The cohort's exclusion table (:func:`write_exclusion_table`) is built from the
current batch manifests and the index's problem tables, not from the records,
so a record left by a dataset or a subject that is no longer configured never
shows up in it.

Records hold no time or host, so two runs that fail alike write the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from bh_models.core.jsonio import atomic_write_text, read_json, write_json

#: Folder of the records, relative to the results directory (the audit skips it).
EXCLUSIONS_DIRNAME = "exclusions"

#: Columns of :func:`exclusion_table` (the records) and of the cohort table.
EXCLUSION_COLUMNS = ["dataset", "subject", "session", "run", "rule", "file", "reason"]

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


def _record_path(results_dir: Path, dataset: str, subject: str, rule: str, unit: str) -> Path:
    digest = hashlib.sha256(str(unit).encode("utf-8")).hexdigest()[:12]
    return _subject_dir(results_dir, dataset, subject) / f"{_label(rule)}_{digest}.json"


def write_exclusion(
    *,
    results_dir: Path,
    dataset: str,
    subject: str,
    rule: str,
    reason: str,
    file: str | os.PathLike,
    unit: str = "",
    session: str = "",
    run: str = "",
    inputs_sha256: str = "",
    params_sha256: str = "",
) -> Path:
    """Record that a unit's step failed on a bad input.

    Parameters
    ----------
    results_dir : Path
        Results directory of the run.
    dataset : str
        Raw dataset name from the config.
    subject : str
        Subject label, with or without ``sub-``.
    rule : str
        Rule whose unit failed.
    reason : str
        What is wrong and how to fix it (the ``BHInputError`` message).
    file : str or Path
        The offending file.
    unit : str
        The unit's key (``sub-01``, ``sub-01_ses-2``, a BOLD stem); one record per unit and rule.
    session, run : str
        The unit's session label and BOLD stem, when it has them.
    inputs_sha256, params_sha256 : str
        Digests of the unit's inputs and parameters when it failed (see
        :func:`bh_models.core.batches.unit_signature`).

    Returns
    -------
    Path
        The record written. Writing the same failure again overwrites it.
    """
    record = {
        "dataset": str(dataset),
        "subject": str(subject).removeprefix("sub-"),
        "session": str(session),
        "run": str(run),
        "unit": str(unit),
        "rule": str(rule),
        "file": _shown_file(file),
        "reason": str(reason),
        "inputs_sha256": str(inputs_sha256),
        "params_sha256": str(params_sha256),
    }
    return write_json(_record_path(results_dir, dataset, subject, rule, unit), record)


def read_exclusion(*, results_dir: Path, dataset: str, subject: str, rule: str, unit: str) -> dict | None:
    """The record of one unit and rule, or None."""
    path = _record_path(results_dir, dataset, subject, rule, unit)
    if not path.is_file():
        return None
    record = read_json(path)
    return record if record.get("rule") == str(rule) and record.get("unit") == str(unit) else None


def clear_exclusions(*, results_dir: Path, dataset: str, subject: str, rule: str, unit: str | None = None) -> int:
    """Remove a subject's records for one rule (one unit, or all), e.g. after the unit succeeded.

    Parameters
    ----------
    results_dir, dataset, subject, rule
        As in :func:`write_exclusion`.
    unit : str, optional
        Only this unit's record; default: every unit of the subject.

    Returns
    -------
    int
        Number of records removed.
    """
    folder = _subject_dir(results_dir, dataset, subject)
    if not folder.is_dir():
        return 0
    removed = 0
    for path in sorted(folder.glob("[!.]*.json")):
        # Compare the recorded rule, not the file name: sanitised names may share prefixes.
        record = read_json(path)
        if record.get("rule") == str(rule) and (unit is None or record.get("unit") == str(unit)):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _sorted_table(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame([{col: str(row.get(col, "") or "") for col in EXCLUSION_COLUMNS} for row in rows],
                         columns=EXCLUSION_COLUMNS)
    return table.drop_duplicates().sort_values(EXCLUSION_COLUMNS, kind="stable").reset_index(drop=True)


def exclusion_table(*, results_dir: Path, out_tsv: Path | None = None) -> pd.DataFrame:
    """Gather every exclusion record of a results folder into one table.

    Parameters
    ----------
    results_dir : Path
        Results directory of the run.
    out_tsv : Path, optional
        Where to write the table (header only when nothing was excluded).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`EXCLUSION_COLUMNS`, sorted, so the same failures always give the same bytes.
    """
    root = Path(results_dir) / EXCLUSIONS_DIRNAME
    records = [read_json(p) for p in sorted(root.glob("*/*/[!.]*.json"))] if root.is_dir() else []
    table = _sorted_table(records)
    if out_tsv is not None:
        atomic_write_text(Path(out_tsv), table.to_csv(sep="\t", index=False))
    return table


def write_exclusion_table(*, manifests: Sequence[Path] = (), problems: Sequence[Path] = (), out_tsv: Path,
                          threads: int = 1) -> dict[str, int]:
    """Step function: the cohort's exclusion table, from the batch manifests and the index problems.

    Parameters
    ----------
    manifests : list of Path
        Every batch manifest of the run (:mod:`bh_models.core.batches`); their
        ``excluded`` rows are the units a step refused, with the file and reason.
    problems : list of Path
        The index's ``<dataset>_problems.tsv`` tables; their rows of kind
        ``problem`` were left out before any job (kind ``note`` rows are
        choices, not exclusions).
    out_tsv : Path
        Written: columns :data:`EXCLUSION_COLUMNS`, ``rule`` naming the step
        (``index`` for planning problems); header only when nobody was left out.
    threads : int
        Unused.
    """
    del threads
    from bh_models.core.batches import STATUS_EXCLUDED, read_manifest

    rows: list[dict] = []
    for path in manifests:
        table = read_manifest(Path(path))
        for row in table[table["status"] == STATUS_EXCLUDED].to_dict(orient="records"):
            rows.append({**row, "rule": row.get("rule", "")})
    for path in problems:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        if "kind" in table:
            table = table[table["kind"] == "problem"]
        for row in table.to_dict(orient="records"):
            reason = row.get("reason", "")
            if row.get("fix"):
                reason = f"{reason}. Fix: {row['fix']}"
            rows.append({**row, "file": row.get("path", ""), "reason": reason, "rule": "index"})
    table = _sorted_table(rows)
    atomic_write_text(Path(out_tsv), table.to_csv(sep="\t", index=False))
    return {"n_rows": int(len(table)), "n_subjects": int(table[["dataset", "subject"]].drop_duplicates().shape[0])}
