"""The cohort plan: which units each stage processes, in which batch, and every choice made.

Built once per Snakemake parse from config.yaml and the fast BIDS index, so the
rules only look names up. A **unit** is what one step call processes:

* an **anatomical unit**: a subject's T1w, one per session that has one (``sub-01``
  or ``sub-01_ses-2``). Within a session the T1w with the lowest run number *by
  value* is used (run-2 before run-10; a file without run entity first), then by
  acquisition and name; the others are listed as notes.
* a **functional unit**: one BOLD run (``sub-01_ses-2_task-rest_dir-LR_run-1``; every
  entity that tells runs apart is in its key). A multi-echo run's echoes are one
  unit, combined by T2*-weighted optimal combination unless ``filters.echo``
  picks one. It is registered through the T1w of its own session; a session
  without one uses the T1w of the nearest session (by label, numbers by value),
  and the choice is a note.

Units are grouped into stable batches by subject
(:func:`bh_models.core.batches.bucket_of`), one anatomical and one functional job
per batch. Problems found here (bad labels, runs without a usable TR, broken
symlinks, unreadable sidecars, BOLD without any T1w, subjects or runs excluded by
config, evaluation tasks whose participants.tsv or column is missing) are kept in
one table with the reason and the fix, and what they touch is left out before
any job runs; notes record the choices. ``bh index`` and ``bh check-config``
print the same table.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bh_models.bids.index import (
    RUN_ENTITIES,
    BidsIndex,
    Filters,
    index_dataset,
    parse_entities,
    participants_columns,
    problem,
    problem_table,
    run_entities,
)
from bh_models.core.batches import batch_label, bucket_of
from bh_models.core.errors import BHConfigError
from bh_models.core.jsonio import write_tsv


def _number_key(label: str | None) -> tuple:
    """Sort key of a label: numbers by value (``2`` before ``10``), then text."""
    if label is None or label == "":
        return (-1, "")
    return (int(label), "") if re.fullmatch(r"\d+", str(label)) else (10**9, str(label))


@dataclass
class DatasetPlan:
    """What the workflow does with one dataset."""

    name: str
    bids_root: Path
    index: BidsIndex
    anat: dict[str, dict]  # anatomical unit key -> unit
    func: dict[str, dict]  # functional unit key (BOLD stem) -> unit
    problems: pd.DataFrame  # PROBLEM_COLUMNS: kind problem (left out) or note (a choice)
    tasks: dict = field(default_factory=dict)  # the evaluation tasks that can run (config targets entries)

    def anat_units(self) -> dict[str, dict]:
        """Anatomical units by key: subject, session, folder, prefix, inputs (the raw T1w)."""
        return self.anat

    def func_units(self) -> dict[str, dict]:
        """Functional units by BOLD stem: inputs (the raw BOLD or its echoes), per-run params, the
        anatomical unit needed."""
        return self.func

    @property
    def anat_subjects(self) -> list[str]:
        return sorted({unit["subject"] for unit in self.anat.values()})

    @property
    def bold_stems(self) -> list[str]:
        return sorted(self.func)

    @property
    def bold(self) -> dict[str, dict]:
        """BOLD stem -> ``{"subject", "path", "tr"}`` (the first echo's path for multi-echo runs)."""
        return {key: {"subject": u["subject"], "path": _first(u["inputs"]["bold"]), "tr": u["params"]["tr_sidecar"]}
                for key, u in self.func.items()}

    def batches(self, buckets: int) -> dict[str, dict[str, list[str]]]:
        """Batch label -> ``{"anat": [unit keys], "func": [unit keys]}``, non-empty batches only, sorted.

        A subject's units always share its bucket, so a functional batch needs only
        the anatomical batch of the same label.
        """
        out: dict[str, dict[str, list[str]]] = {}
        for kind, units in (("anat", self.anat), ("func", self.func)):
            for key, unit in units.items():
                label = batch_label(bucket_of(unit["subject"], buckets), buckets)
                out.setdefault(label, {"anat": [], "func": []})[kind].append(key)
        return dict(sorted(out.items()))


def _first(value):
    return value[0] if isinstance(value, list) else value


def _anat_units(runs: pd.DataFrame, notes: list[dict]) -> dict[str, dict]:
    """One unit per (subject, session) with a T1w: the lowest run number by value wins."""
    units: dict[str, dict] = {}
    t1w = runs[runs["suffix"] == "T1w"]
    # Plain grouping, not DataFrame.groupby: a cohort has one group per subject, and pandas'
    # per-group overhead was half of planning time at 70,933 subjects.
    groups: dict[tuple[str, str], list] = {}
    for row in t1w.itertuples(index=False):
        session = "" if pd.isna(row.session) else row.session
        groups.setdefault((row.subject, session), []).append((row.path, row.run, row.acquisition))
    for (subject, session), candidates in sorted(groups.items()):
        if len(candidates) > 1:
            candidates.sort(key=lambda item: (_number_key(item[1]), str(item[2] or ""), Path(item[0]).name))
        chosen = candidates[0][0]
        key = f"sub-{subject}" + (f"_ses-{session}" if session else "")
        units[key] = {"key": key, "subject": subject, "session": session, "run": "",
                      "folder": f"sub-{subject}" + (f"/ses-{session}" if session else ""), "prefix": key,
                      "inputs": {"t1w": chosen}, "params": {}}
        if len(candidates) > 1:
            others = ", ".join(Path(p).name for p, _, _ in candidates[1:])
            notes.append(problem(subject, chosen, f"{len(candidates)} T1w images in "
                                 f"{'session ' + session if session else 'the subject'}: used "
                                 f"{Path(chosen).name} (lowest run number by value), not {others}",
                                 "list the wanted image alone, or rename, if another one should be used",
                                 session=session, kind="note"))
    return units


def _nearest(session: str, available: list[str]) -> str:
    """The available session nearest to ``session`` by label order (numbers by value); ties: the earlier."""
    ordered = sorted(available, key=_number_key)
    if session in ordered:
        return session
    target = _number_key(session)
    if target[0] < 10**9:
        numeric = [s for s in ordered if _number_key(s)[0] < 10**9]
        if numeric:
            return min(numeric, key=lambda s: (abs(_number_key(s)[0] - target[0]), _number_key(s)))
    return ordered[0]


def _func_units(runs: pd.DataFrame, anat: dict[str, dict], *, filters: Filters, exclude_runs: set[str],
                problems: list[dict], notes: list[dict]) -> dict[str, dict]:
    """One unit per BOLD run (echoes of a multi-echo run together), each with the anatomical unit it needs."""
    units: dict[str, dict] = {}
    bold = runs[runs["suffix"] == "bold"]
    anat_by_subject: dict[str, dict[str, str]] = {}
    for key, unit in anat.items():
        anat_by_subject.setdefault(unit["subject"], {})[unit["session"]] = key
    groups: dict[tuple[str, str], list] = {}
    for row in bold.itertuples(index=False):
        ents, _, _ = parse_entities(Path(row.path).name)
        stem_entities = run_entities(ents, drop=("echo",))
        groups.setdefault((row.subject, stem_entities), []).append((row, ents))
    for (subject, stem_entities), members in sorted(groups.items()):
        stem = f"sub-{subject}" + (f"_{stem_entities}" if stem_entities else "")
        first, ents = members[0]
        session = first.session if isinstance(first.session, str) else ""
        names = {Path(row.path).name for row, _ in members}
        if stem in exclude_runs or names & exclude_runs:
            problems.append(problem(subject, first.path, "listed in exclude_runs in config.yaml",
                                    "remove it from datasets.<name>.exclude_runs to process it", session=session))
            continue
        members = sorted(members, key=lambda item: _number_key(item[1].get("echo")))
        paths = [row.path for row, _ in members]
        params = {"tr_sidecar": float(first.repetition_time)}
        if len(members) > 1 or "echo" in ents:
            echoes = [row.echo for row, _ in members]
            times = [row.echo_time for row, _ in members]
            if len(members) == 1:
                notes.append(problem(subject, first.path, f"echo {echoes[0]} of a multi-echo run used alone"
                                     + (" (filters.echo)" if filters.echo is not None else ""), "",
                                     session=session, kind="note"))
                paths = paths[0]
            elif any(t is None or not t > 0 for t in times):
                problems.append(problem(subject, first.path, f"multi-echo run ({len(members)} echoes) without an "
                                        "EchoTime for every echo, which the optimal combination needs",
                                        "add EchoTime (s) to the echoes' sidecars, or set datasets.<name>.filters."
                                        "echo to use one echo", session=session))
                continue
            else:
                params["echo_times"] = [float(t) for t in times]
                notes.append(problem(subject, first.path, f"{len(members)} echoes (TE "
                                     + ", ".join(f"{1000 * t:g}" for t in times) + " ms) combined by T2*-weighted "
                                     "optimal combination (Posse et al. 1999)",
                                     "set datasets.<name>.filters.echo to use one echo instead",
                                     session=session, kind="note"))
        else:
            paths = paths[0]
        sessions = anat_by_subject.get(subject, {})
        if not sessions:
            problems.append(problem(subject, first.path, "BOLD run but the subject has no T1w, which "
                                    "coregistration needs", "add the subject's T1w (the run is skipped until then)",
                                    session=session))
            continue
        used = _nearest(session, list(sessions))
        if used != session:
            notes.append(problem(subject, first.path, f"no T1w in {'session ' + session if session else 'its folder'}"
                                 f": registered through the T1w of session {used} (nearest session)",
                                 "add a T1w to the run's session to use that one", session=session, kind="note"))
        units[stem] = {"key": stem, "subject": subject, "session": session, "run": stem,
                       "folder": f"sub-{subject}" + (f"/ses-{session}" if session else ""), "prefix": stem,
                       "inputs": {"bold": paths}, "params": params, "needs": sessions[used]}
    return units


def _task_problems(name: str, entry: dict, root: Path, problems: list[dict]) -> dict:
    """The evaluation tasks whose participants.tsv column (and covariates) exist; the others are problems."""
    targets = dict(entry.get("targets") or {})
    if not targets:
        return {}
    columns = participants_columns(root)
    usable = {}
    for task, spec in targets.items():
        if columns is None:
            problems.append(problem("", root / "participants.tsv", f"participants.tsv is missing, so task '{task}' "
                                    "cannot be evaluated", "add participants.tsv with participant_id and the "
                                    f"task's column '{spec['column']}' (preprocessing runs without it)"))
            continue
        missing = [c for c in [spec["column"], *spec.get("covariates", [])] if c not in columns]
        if missing:
            problems.append(problem("", root / "participants.tsv", f"task '{task}' needs column(s) "
                                    f"{', '.join(missing)}, which participants.tsv lacks",
                                    f"add the column, or fix datasets.{name}.targets.{task}"))
            continue
        usable[task] = spec
    return usable


def plan_dataset(name: str, entry: dict, *, base_dir: Path = Path(".")) -> DatasetPlan:
    """Index a dataset and decide what runs.

    Parameters
    ----------
    name, entry
        The dataset's key and its (default-filled) config entry.
    base_dir
        Folder relative ``bids_root`` paths start from.

    Raises
    ------
    BHConfigError
        When ``stratify`` names a column participants.tsv lacks (a config mistake,
        found before any job).
    """
    root = (base_dir / entry["bids_root"]).resolve()
    filters = Filters.from_config(entry.get("filters"))
    index = index_dataset(root, dataset=name, filters=filters, tr_override=entry.get("tr_override"),
                          exclude_subjects=set(entry.get("exclude_subjects", [])))
    problems: list[dict] = []
    notes: list[dict] = []
    anat = _anat_units(index.runs, notes)
    func = _func_units(index.runs, anat, filters=filters, exclude_runs=set(entry.get("exclude_runs", [])),
                       problems=problems, notes=notes)
    tasks = _task_problems(name, entry, root, problems)
    stratify = entry.get("stratify")
    if stratify:
        columns = participants_columns(root)
        if columns is None or stratify not in columns:
            raise BHConfigError(f"datasets.{name}.stratify", f"column '{stratify}' is not in {root}/participants.tsv"
                                + (" (the file is missing)" if columns is None else ""),
                                "name an existing participants.tsv column, or set stratify: null")
    own = problem_table(problems + notes, dataset=name)
    table = pd.concat([index.problems, own], ignore_index=True) if len(index.problems) else own
    table = table.sort_values(["subject", "session", "path", "kind"], kind="stable").reset_index(drop=True)
    return DatasetPlan(name=name, bids_root=root, index=index, anat=anat, func=func, problems=table, tasks=tasks)


def plan_cohort(config: dict, *, base_dir: Path = Path(".")) -> dict[str, DatasetPlan]:
    """One :class:`DatasetPlan` per configured dataset, in config order."""
    return {name: plan_dataset(name, entry, base_dir=base_dir) for name, entry in config["datasets"].items()}


def write_index(
    *,
    dataset_description: Path,
    out_runs: Path,
    out_subjects: Path,
    out_problems: Path,
    dataset: str,
    filters: dict | None = None,
    tr_override: float | None = None,
    exclude_subjects: list[str] | None = None,
    exclude_runs: list[str] | None = None,
    targets: dict | None = None,
    threads: int = 1,
) -> dict:
    """Step function: write a dataset's run, subject and problem tables.

    Parameters
    ----------
    dataset_description : Path
        The raw dataset's ``dataset_description.json``: its folder is the BIDS
        root indexed (the rule's input, so Snakemake tracks it).
    out_runs, out_subjects, out_problems : Path
        The three tables. Paths in them are relative to the BIDS root, so the
        tables do not depend on where the dataset is mounted. The problems table
        has a row per item left out (kind ``problem``, with the fix) and per
        choice made (kind ``note``).
    dataset : str
        Dataset name (config key).
    filters, tr_override, exclude_subjects, exclude_runs, targets
        The dataset's config entries of the same names.
    threads : int
        Unused.
    """
    root = Path(dataset_description).parent.resolve()
    plan = plan_dataset(dataset, {"bids_root": str(root), "filters": filters or {}, "tr_override": tr_override,
                                  "exclude_subjects": exclude_subjects or [], "exclude_runs": exclude_runs or [],
                                  "targets": targets or {}})

    def rel(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        frame["path"] = [_relative(p, root) for p in frame["path"]]
        return frame

    write_tsv(rel(plan.index.runs), out_runs, na_rep="n/a")
    write_tsv(plan.index.subjects, out_subjects, na_rep="n/a")
    write_tsv(rel(plan.problems), out_problems, na_rep="n/a")
    kinds = plan.problems["kind"].value_counts()
    return {"subjects": len(plan.index.subjects), "anat_units": len(plan.anat), "bold_runs": len(plan.func),
            "problems": int(kinds.get("problem", 0)), "notes": int(kinds.get("note", 0))}


def _relative(path: str, root: Path) -> str:
    # Lexical, not resolved: a broken symlink's problem row names the link, not its target.
    if not path or not os.path.isabs(path):
        return path
    prefix = str(root).rstrip(os.sep) + os.sep
    return os.path.relpath(path, root) if path.startswith(prefix) or path == str(root) else path


__all__ = ["DatasetPlan", "RUN_ENTITIES", "plan_cohort", "plan_dataset", "write_index"]
