"""The cohort plan: which units each stage processes, and in which batch.

Built once per Snakemake parse from config.yaml and the fast BIDS index, so the
rules only look names up. A **unit** is what one step call processes: an
anatomical unit (a subject's T1w) or a functional unit (one BOLD run, which
needs its subject's anatomical unit). Units are grouped into stable batches by
subject (:func:`bh_models.core.batches.bucket_of`), one anatomical and one
functional job per batch. Problems found here (bad labels, runs without a TR,
BOLD without a T1w, subjects excluded by config) are kept in one table with the
reason, and those units are left out before any job runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bh_models.bids.index import BidsIndex, Filters, bold_stem, index_dataset
from bh_models.core.batches import batch_label, bucket_of
from bh_models.core.jsonio import write_tsv


@dataclass
class DatasetPlan:
    """What the workflow does with one dataset."""

    name: str
    bids_root: Path
    index: BidsIndex
    t1w: dict[str, str]            # subject -> T1w path (first T1w after sorting)
    bold: dict[str, dict]          # bold stem -> {"subject", "path", "tr", "tr_source"}
    problems: pd.DataFrame
    _units: dict = field(default_factory=dict, repr=False)

    @property
    def anat_subjects(self) -> list[str]:
        return sorted(self.t1w)

    @property
    def bold_stems(self) -> list[str]:
        return sorted(self.bold)

    def anat_units(self) -> dict[str, dict]:
        """Anatomical units by key (``sub-<label>``): subject, folder, prefix, inputs (the raw T1w)."""
        if "anat" not in self._units:
            self._units["anat"] = self._anat_units()
        return self._units["anat"]

    def func_units(self) -> dict[str, dict]:
        """Functional units by BOLD stem: inputs (the raw BOLD), per-run params, and the anatomical unit needed."""
        if "func" not in self._units:
            self._units["func"] = self._func_units()
        return self._units["func"]

    def _anat_units(self) -> dict[str, dict]:
        return {f"sub-{subject}": {"key": f"sub-{subject}", "subject": subject, "session": "", "run": "",
                                   "folder": f"sub-{subject}", "prefix": f"sub-{subject}",
                                   "inputs": {"t1w": path}, "params": {}}
                for subject, path in sorted(self.t1w.items())}

    def _func_units(self) -> dict[str, dict]:
        units = {}
        for stem in self.bold_stems:
            entry = self.bold[stem]
            units[stem] = {"key": stem, "subject": entry["subject"], "session": "", "run": stem,
                           "folder": f"sub-{entry['subject']}", "prefix": stem, "inputs": {"bold": entry["path"]},
                           "params": {"tr_sidecar": entry["tr"]}, "needs": f"sub-{entry['subject']}"}
        return units

    def batches(self, buckets: int) -> dict[str, dict[str, list[str]]]:
        """Batch label -> ``{"anat": [unit keys], "func": [unit keys]}``, non-empty batches only, sorted.

        A subject's units always share its bucket, so a functional batch needs only
        the anatomical batch of the same label.
        """
        out: dict[str, dict[str, list[str]]] = {}
        for kind, units in (("anat", self.anat_units()), ("func", self.func_units())):
            for key, unit in units.items():
                label = batch_label(bucket_of(unit["subject"], buckets), buckets)
                out.setdefault(label, {"anat": [], "func": []})[kind].append(key)
        return dict(sorted(out.items()))


def plan_dataset(name: str, entry: dict, *, base_dir: Path = Path(".")) -> DatasetPlan:
    """Index a dataset and decide what runs.

    Parameters
    ----------
    name, entry
        The dataset's key and its (default-filled) config entry.
    base_dir
        Folder relative ``bids_root`` paths start from.
    """
    root = (base_dir / entry["bids_root"]).resolve()
    exclude = set(entry.get("exclude_subjects", []))
    index = index_dataset(
        root, dataset=name, filters=Filters.from_config(entry.get("filters")),
        tr_override=entry.get("tr_override"), exclude_subjects=exclude,
    )
    runs = index.runs
    # Vectorised, not grouped: 70,000 subjects must plan in seconds. Runs are sorted by
    # subject, datatype and path, so the first T1w row of a subject is its first T1w.
    first = runs[runs["suffix"] == "T1w"].drop_duplicates("subject")
    t1w = dict(zip(first["subject"], first["path"]))
    bold, extra = {}, []
    functional = runs[runs["suffix"] == "bold"]
    for subject, path, tr, source in zip(functional["subject"], functional["path"], functional["repetition_time"],
                                         functional["tr_source"]):
        if subject not in t1w:
            extra.append(dict(dataset=name, subject=subject, path=path,
                              reason="BOLD run but the subject has no T1w, which coregistration needs; "
                                     "add the subject's T1w (the run is skipped until then)"))
            continue
        bold[bold_stem(path)] = dict(subject=subject, path=path, tr=tr, tr_source=source)
    problems = pd.concat([index.problems, pd.DataFrame(extra, columns=index.problems.columns)], ignore_index=True)
    return DatasetPlan(name=name, bids_root=root, index=index, t1w=t1w, bold=bold, problems=problems)


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
        tables do not depend on where the dataset is mounted.
    dataset : str
        Dataset name (config key).
    filters, tr_override, exclude_subjects
        The dataset's config entries of the same names.
    threads : int
        Unused.
    """
    root = Path(dataset_description).parent.resolve()
    plan = plan_dataset(dataset, {"bids_root": str(root), "filters": filters or {}, "tr_override": tr_override,
                                  "exclude_subjects": exclude_subjects or []})

    def rel(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        frame["path"] = [str(Path(p).resolve().relative_to(root)) if p else p for p in frame["path"]]
        return frame

    write_tsv(rel(plan.index.runs), out_runs, na_rep="n/a")
    write_tsv(plan.index.subjects, out_subjects, na_rep="n/a")
    write_tsv(rel(plan.problems), out_problems, na_rep="n/a")
    return {"subjects": len(plan.index.subjects), "bold_runs": len(plan.bold), "problems": len(plan.problems)}
