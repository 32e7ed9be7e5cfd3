"""Subject batches: one Snakemake job for many units, with a manifest as its declared output.

Why
---
Snakemake's planning cost grows with the number of jobs. One job per subject
and step is ~140,000 jobs for UK Biobank, minutes and gigabytes just to plan.
So the per-subject rules run one job per *batch* of units instead:

* a **unit** is what one step function processes: an anatomical unit (a
  subject's T1w, per session when sessions have their own) or a functional
  unit (one BOLD run);
* every subject falls in a **stable bucket**, ``sha256(label) mod buckets``
  (:func:`bucket_of`), the same for its anatomical and functional units, so
  adding a subject touches one batch and never moves another subject;
* a batch job runs the unit step function (``preprocess_anat``,
  ``preprocess_bold``, unchanged) once per unit and writes the per-unit
  outputs at their usual BIDS-derivatives paths (undeclared to Snakemake),
  one provenance record per unit, and, as its only declared outputs, a small
  **manifest** TSV (each unit's status and output files) and a QC page.

Properties (tested in ``tests/core/test_batches.py`` and the workflow tests)
-----------------------------------------------------------------------------
* A unit whose outputs are complete and recorded (its provenance record lists
  the same parameters, and every recorded input and output still has its
  recorded sha256, through the stat-keyed hash cache) is skipped: rerunning a
  batch redoes only what is missing or changed.
* A unit that meets bad input (``BHInputError``) gets an exclusion record and
  the status ``excluded``; the batch goes on, and the job **succeeds** with the
  exclusion listed, so a cohort finishes in one invocation. The unit is not
  retried until its inputs or parameters change.
* Any other error (a bug, a killed worker) marks the unit ``failed``; the
  batch finishes its other units, then the job fails. Snakemake's retry, or
  the next invocation, redoes the failed unit alone: the others are recorded.
* Consumers read manifests, not per-subject file lists: an input named
  ``listed_<arg>`` holds manifests, and the step runner passes ``<arg>`` as the
  files of column :data:`LISTED_COLUMNS` ``[<arg>]`` of the units marked
  ``done`` (:func:`listed_files`).

Workers
-------
A batch job with ``threads`` > 1 runs that many units at once, each in its own
spawned process on one thread: every unit's computation is the single-threaded
one of a per-subject job, so outputs do not depend on the worker count.
"""

from __future__ import annotations

import base64
import concurrent.futures as futures
import hashlib
import html
import io
import json
import logging
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from bh_models.core.errors import BHInputError
from bh_models.core.hashing import HashCache, canonical_json_sha256, hash_cache_dir
from bh_models.core.jsonio import atomic_write_text, read_json

log = logging.getLogger("bh_models")

STATUS_DONE, STATUS_EXCLUDED, STATUS_FAILED = "done", "excluded", "failed"

#: Fixed columns of a manifest, then one column per unit output (paths relative to the manifest's folder).
MANIFEST_COLUMNS = ["unit", "dataset", "subject", "session", "run", "rule", "status", "reason", "file"]

#: ``listed_<arg>`` inputs: the step argument -> the manifest column whose files it receives.
LISTED_COLUMNS = {
    "sidecars": "dep_sidecar",
    "t1_tensors": "out_tensor",
    "timeseries": "out_timeseries",
    "confounds": "out_confounds",
}

#: Input name prefix of manifests whose listed files a consumer receives.
LISTED_PREFIX = "listed_"

#: Units per worker process before it is replaced (bounds leaks of the imaging libraries).
TASKS_PER_WORKER = 8

#: Longest side (pixels) and JPEG quality of the figure thumbnails on a batch's QC page
#: (~30 kB each, so a batch of 70 subjects' figures is a few MB; full-size PNGs stay beside the data).
THUMBNAIL_PX, THUMBNAIL_QUALITY = 480, 75


def bucket_of(subject: str, buckets: int) -> int:
    """Stable bucket of a subject label: ``int(sha256(label)[:16], 16) mod buckets``.

    Depends on the label alone (not on the other subjects, the dataset or the
    order of discovery), so a subject never changes batch while ``buckets`` is fixed.
    """
    if int(buckets) < 1:
        raise ValueError("buckets must be >= 1")
    digest = hashlib.sha256(str(subject).encode("utf-8")).hexdigest()
    return int(digest[:16], 16) % int(buckets)


def batch_label(bucket: int, buckets: int) -> str:
    """Zero-padded batch label (``0042`` of 1000 buckets), so batches sort as numbers."""
    return f"{int(bucket):0{max(4, len(str(int(buckets) - 1)))}d}"


def unit_signature(*, inputs: Mapping[str, Any], params: Mapping[str, Any], cache: HashCache) -> tuple[str, str]:
    """Digests of a unit's input files (sha256 via ``cache``; ``missing`` for absent files) and params."""
    files = []
    for name, value in sorted(inputs.items()):
        for path in value if isinstance(value, (list, tuple)) else [value]:
            files.append([name, str(path), cache.sha256_path(path=path) or "missing"])
    return canonical_json_sha256(obj=files), canonical_json_sha256(obj=_jsonable(params))


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# --------------------------------------------------------------------------- manifests


def read_manifest(path: Path) -> pd.DataFrame:
    """A manifest as strings (empty cells ''), output paths made relative to the working directory."""
    path = Path(path)
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    folder = os.path.dirname(os.fspath(path))
    for column in table.columns:
        if column not in MANIFEST_COLUMNS:
            table[column] = [os.path.normpath(os.path.join(folder, v)) if v else "" for v in table[column]]
    return table


def write_manifest(rows: Sequence[Mapping[str, Any]], *, output_names: Sequence[str], path: Path) -> None:
    """Write a manifest: one row per unit (sorted by unit), output paths relative to the manifest's folder."""
    path = Path(path)
    folder = os.path.dirname(os.path.abspath(path))
    out = []
    for row in sorted(rows, key=lambda r: r["unit"]):
        line = {column: str(row.get(column, "") or "") for column in MANIFEST_COLUMNS}
        for name in output_names:
            value = (row.get("outputs") or {}).get(name, "")
            line[name] = Path(os.path.relpath(os.path.abspath(value), folder)).as_posix() if value else ""
        out.append(line)
    table = pd.DataFrame(out, columns=[*MANIFEST_COLUMNS, *output_names])
    atomic_write_text(path, table.to_csv(sep="\t", index=False, lineterminator="\n"))


def listed_files(*, manifests: Iterable[Path], column: str) -> list[tuple[str, str]]:
    """``(path, dataset)`` of column ``column`` for every ``done`` unit of the manifests, sorted by path."""
    found = []
    for manifest in manifests:
        table = read_manifest(Path(manifest))
        if column not in table.columns:
            raise BHInputError(manifest, f"the manifest has no column '{column}'",
                               "rerun its batch with the current workflow (delete the manifest)")
        done = table[table["status"] == STATUS_DONE]
        found += [(p, d) for p, d in zip(done[column], done["dataset"]) if p]
    return sorted(found)


def stale_manifests(*, manifests: Iterable[Path]) -> list[str]:
    """Existing manifests listing a ``done`` output file that no longer exists.

    Such a batch must run again (it then redoes only the units whose files are
    gone): the workflow forces these manifests at planning time, so a deleted
    per-subject file is remade instead of Snakemake reporting nothing to do.
    """
    import csv

    stale = []
    for manifest in manifests:
        try:
            fh = open(manifest, newline="", encoding="utf-8")
        except FileNotFoundError:
            continue
        with fh:  # csv, not pandas: planning reads every manifest of the cohort
            rows = csv.reader(fh, delimiter="\t")
            header = next(rows, [])
            status = header.index("status") if "status" in header else None
            outputs = [i for i, column in enumerate(header) if column not in MANIFEST_COLUMNS]
            folder = os.path.dirname(os.fspath(manifest))
            for row in rows:
                if status is None or row[status] != STATUS_DONE:
                    continue
                if any(row[i] and not os.path.exists(os.path.join(folder, row[i])) for i in outputs):
                    stale.append(os.fspath(manifest))
                    break
    return stale


def raw_signature(paths: Iterable[str]) -> str:
    """sha256 of ``path, size, mtime`` of each file (``missing`` when absent): changes when any file does."""
    lines = []
    for path in paths:
        try:
            st = os.stat(path)
            lines.append(f"{path}\t{st.st_size}\t{st.st_mtime_ns}")
        except OSError:
            lines.append(f"{path}\tmissing")
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


def outdate(manifest: str | os.PathLike) -> None:
    """Date a manifest back to 1970 (content unchanged), so Snakemake finds its inputs newer and reruns its batch."""
    os.utime(manifest, ns=(os.stat(manifest).st_atime_ns, 1_000_000_000))


# --------------------------------------------------------------------------- units


@dataclass(frozen=True)
class UnitJob:
    """Everything one unit's run needs (picklable: it travels to a worker process)."""

    step: str
    rule: str
    dataset: str
    unit: dict  # key, subject, session, run, folder, prefix, inputs, params
    outputs: dict[str, str]
    params: dict
    results_dir: str
    config: dict
    log_file: str
    bids_roots: dict = field(default_factory=dict)

    @property
    def inputs(self) -> dict[str, Any]:
        return dict(self.unit.get("inputs", {}))

    @property
    def wildcards(self) -> dict[str, str]:
        wildcards = {"dataset": self.dataset, "subject": self.unit["subject"]}
        if self.unit.get("run"):
            wildcards["bold"] = self.unit["run"]
        elif self.unit.get("session"):
            wildcards["session"] = self.unit["session"]
        return wildcards


def format_outputs(templates: Mapping[str, str], unit: Mapping[str, Any]) -> dict[str, str]:
    """A unit's output paths: the templates with ``{subject}``, ``{folder}`` and ``{prefix}`` filled."""
    fields = {"subject": unit["subject"], "folder": unit["folder"], "prefix": unit["prefix"]}
    return {name: template.format(**fields) for name, template in templates.items()}


def _record_path(job: UnitJob) -> Path:
    from bh_models.core.provenance import job_key, provenance_dir

    return provenance_dir(results_dir=Path(job.results_dir)) / job.rule / f"{job_key(wildcards=job.wildcards)}.json"


def is_complete(job: UnitJob, cache: HashCache) -> bool:
    """True when the unit's record lists the same params, its outputs, and every recorded file is unchanged."""
    from bh_models.core.provenance import portable_path, recorded_path_resolver

    path = _record_path(job)
    if not path.is_file():
        return False
    record = read_json(path)
    if record.get("params") != _jsonable(job.params):
        return False
    recorded_outputs = {e["path"] for entries in record.get("outputs", {}).values() for e in entries}
    workdir = Path.cwd()
    expected = {portable_path(path=p, workdir=workdir, bids_roots=job.bids_roots) for p in job.outputs.values()}
    if not expected <= recorded_outputs:
        return False
    resolve = recorded_path_resolver(workdir=workdir, bids_roots=job.bids_roots)
    for kind in ("inputs", "outputs"):
        for entries in record.get(kind, {}).values():
            for entry in entries:
                try:
                    current = cache.sha256_path(path=resolve(entry["path"]))
                except KeyError:  # a BIDS URI of a dataset no longer configured
                    return False
                if current is None or current != entry.get("sha256"):
                    return False
    return True


def _passed(outputs: Mapping[str, str]) -> dict[str, Path]:
    from bh_models.core.step import DEPENDENCY_PREFIX

    return {k: Path(v) for k, v in outputs.items() if not k.startswith(DEPENDENCY_PREFIX)}


def _as_paths(value: Any) -> Any:
    return [Path(v) for v in value] if isinstance(value, (list, tuple)) else Path(value)


def execute_unit(job: UnitJob) -> dict[str, str]:
    """Run one unit's step function and record it: provenance when done, an exclusion record when refused.

    Returns ``{"unit", "status", "reason", "file"}``; never raises for a failing unit.
    """
    from bh_models.core.exclusions import clear_exclusions, write_exclusion
    from bh_models.core.provenance import record_job
    from bh_models.core.step import limit_threads, resolve, with_sidecars

    unit = job.unit
    handler = _unit_log_handler(job.log_file)
    logger = logging.getLogger()
    logger.addHandler(handler)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    result = {"unit": unit["key"], "status": STATUS_DONE, "reason": "", "file": ""}
    try:
        limit_threads(1)
        log.info("rule %s, unit %s of %s: %s", job.rule, unit["key"], job.dataset, job.step)
        func = resolve(job.step)
        cache = HashCache(cache_dir=hash_cache_dir(results_dir=Path(job.results_dir)))
        inputs_sha, params_sha = unit_signature(inputs=job.inputs, params=job.params, cache=cache)
        try:
            func(**{k: _as_paths(v) for k, v in job.inputs.items()}, **_passed(job.outputs), **job.params, threads=1)
        except BHInputError as exc:
            log.error("bad input, unit %s excluded: %s", unit["key"], exc)
            write_exclusion(results_dir=Path(job.results_dir), dataset=job.dataset, subject=unit["subject"],
                            session=unit.get("session", ""), run=unit.get("run", ""), unit=unit["key"],
                            rule=job.rule, reason=str(exc), file=exc.path, inputs_sha256=inputs_sha,
                            params_sha256=params_sha)
            return {**result, "status": STATUS_EXCLUDED, "reason": str(exc), "file": exc.path}
        log.info("unit %s done in %.1f s", unit["key"], time.perf_counter() - t0)
        outputs = {k: [v] for k, v in job.outputs.items()}
        inputs = {k: [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)] for k, v in job.inputs.items()}
        record_job(results_dir=Path(job.results_dir), rule=job.rule, wildcards=job.wildcards, inputs=inputs,
                   outputs=with_sidecars(outputs), params=_jsonable(job.params), config=job.config,
                   seed=job.params.get("seed", job.config.get("seed")), started=started,
                   finished=datetime.now(timezone.utc).isoformat(timespec="seconds"), log=job.log_file,
                   bids_roots=job.bids_roots, hash_cache=cache)
        clear_exclusions(results_dir=Path(job.results_dir), dataset=job.dataset, subject=unit["subject"],
                         rule=job.rule, unit=unit["key"])
        return result
    except Exception as exc:  # a bug or a broken dependency: this unit fails, the batch goes on
        log.error("unit %s failed:\n%s", unit["key"], traceback.format_exc())
        return {**result, "status": STATUS_FAILED, "reason": f"{type(exc).__name__}: {exc}",
                "file": str(job.log_file)}
    finally:
        logger.removeHandler(handler)
        handler.close()


def _unit_log_handler(log_file: str) -> logging.Handler:
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    return handler


def _worker_init() -> None:
    logging.basicConfig(level=logging.INFO, force=True, handlers=[logging.NullHandler()])


def _run_pending(jobs: list[UnitJob], workers: int) -> list[dict[str, str]]:
    if workers <= 1 or len(jobs) <= 1:
        return [execute_unit(job) for job in jobs]
    results: dict[int, dict[str, str]] = {}
    context = mp.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context,
                                     initializer=_worker_init, max_tasks_per_child=TASKS_PER_WORKER) as pool:
        submitted = {pool.submit(execute_unit, job): i for i, job in enumerate(jobs)}
        for done in futures.as_completed(submitted):
            i = submitted[done]
            try:
                results[i] = done.result()
            except Exception as exc:  # the worker process died (out of memory, a signal)
                results[i] = {"unit": jobs[i].unit["key"], "status": STATUS_FAILED,
                              "reason": f"worker died: {type(exc).__name__}: {exc}", "file": jobs[i].log_file}
            log.info("unit %s: %s", results[i]["unit"], results[i]["status"])
    return [results[i] for i in range(len(jobs))]


@dataclass(frozen=True)
class JobContext:
    """What the step runner knows about a job, for steps that run units (:func:`run_units`)."""

    rule: str
    wildcards: dict
    config: dict
    results_dir: str
    log_file: str | None


def unit_log_path(*, results_dir: str, rule: str, dataset: str, unit: str) -> str:
    """``<results>/logs/<rule>/<dataset>/<unit>.log``: one log per unit, beside the batch's own."""
    return os.path.join(results_dir, "logs", rule, dataset, f"{unit}.log")


def run_units(
    *,
    out_manifest: Path,
    unit_step: str,
    batch_units: Sequence[Mapping[str, Any]],
    batch_outputs: Mapping[str, str],
    batch_figures: Sequence[str] = (),
    batch_raw_signature: str = "",
    needs_manifest: Path | Sequence[Path] | None = None,
    out_qc: Path | None = None,
    job_context: JobContext,
    threads: int = 1,
    **params: Any,
) -> dict[str, int]:
    """Step function of a batch job: run ``unit_step`` for every unit not already done.

    Parameters
    ----------
    out_manifest : Path
        Written: the batch's manifest (:data:`MANIFEST_COLUMNS` and one column
        per unit output), one row per unit.
    unit_step : str
        ``"module:function"`` of the unit step (e.g. ``preprocess_anat``).
    batch_units : list of dict
        The units: ``key``, ``subject``, ``session``, ``run``, ``folder``,
        ``prefix``, ``inputs`` (named files of the unit step), ``params``
        (unit-specific keyword arguments) and optionally ``needs`` (the key of
        a unit of ``needs_manifest`` that must be done, e.g. the T1w of a BOLD run).
    batch_outputs : dict
        Unit output name -> path template (``{subject}``, ``{folder}``, ``{prefix}``).
    batch_figures : list of str
        Unit outputs that are PNG figures, shown on the QC page.
    batch_raw_signature : str
        Digest of the batch's raw files (:func:`raw_signature`); only Snakemake uses
        it (a change reruns the batch).
    needs_manifest : Path or list of Path, optional
        Manifests of the batches this one depends on.
    out_qc : Path, optional
        Written: an HTML page with each unit's status and figure thumbnails.
    job_context : JobContext
        The job's rule, config and results folder (given by the step runner).
    threads : int
        Units run at once (worker processes, one thread each).
    **params
        Keyword arguments every unit step receives.

    Returns
    -------
    dict
        Units per status, and how many were skipped as already done or excluded.

    Raises
    ------
    RuntimeError
        After every unit ran, when any failed for a reason other than bad
        input; the recorded units stay done.
    """
    del batch_raw_signature
    results_dir = job_context.results_dir
    dataset = job_context.wildcards.get("dataset", "")
    rule = job_context.rule
    roots = {name: entry["bids_root"] for name, entry in job_context.config.get("datasets", {}).items()}
    needs = _read_needs(needs_manifest)
    cache = HashCache(cache_dir=hash_cache_dir(results_dir=Path(results_dir)))
    rows: list[dict] = []
    pending: list[UnitJob] = []
    counts = {"skipped_done": 0, "skipped_excluded": 0}
    for unit in batch_units:
        unit = dict(unit)
        job = UnitJob(step=unit_step, rule=rule, dataset=dataset, unit=unit,
                      outputs=format_outputs(batch_outputs, unit), params={**params, **unit.get("params", {})},
                      results_dir=str(results_dir), config=dict(job_context.config),
                      log_file=unit_log_path(results_dir=str(results_dir), rule=rule, dataset=dataset,
                                             unit=unit["key"]),
                      bids_roots=roots)
        row = {"unit": unit["key"], "dataset": dataset, "subject": unit["subject"],
               "session": unit.get("session", ""), "run": unit.get("run", ""), "rule": rule, "outputs": job.outputs}
        blocker = _blocked_by(unit, needs)
        if blocker is not None:
            rows.append({**row, "status": STATUS_EXCLUDED, **blocker, "outputs": {}})
            continue
        if is_complete(job, cache):
            counts["skipped_done"] += 1
            rows.append({**row, "status": STATUS_DONE})
            continue
        refused = _still_excluded(job, cache)
        if refused is not None:
            counts["skipped_excluded"] += 1
            rows.append({**row, "status": STATUS_EXCLUDED, "reason": refused["reason"], "file": refused["file"],
                         "outputs": {}})
            continue
        pending.append(job)
        rows.append(row)
    log.info("batch %s of %s: %d units, %d already done, %d still excluded, %d to run on %d worker(s)",
             job_context.wildcards.get("batch", "?"), dataset, len(rows), counts["skipped_done"],
             counts["skipped_excluded"], len(pending), max(1, min(int(threads), len(pending))))
    outcome = {r["unit"]: r for r in _run_pending(pending, int(threads))}
    for row in rows:
        if row["unit"] in outcome and "status" not in row:
            result = outcome[row["unit"]]
            row.update(status=result["status"], reason=result["reason"], file=result["file"])
            if result["status"] != STATUS_DONE:
                row["outputs"] = {}
    failed = [r for r in rows if r["status"] == STATUS_FAILED]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(rows)} units failed (the others are recorded and are not redone "
                           "when the job is retried): "
                           + "; ".join(f"{r['unit']}: {r['reason']} (log {r['file']})" for r in failed[:5]))
    write_manifest(rows, output_names=list(batch_outputs), path=Path(out_manifest))
    if out_qc is not None:
        write_qc_page(rows=rows, figures=list(batch_figures), out_html=Path(out_qc),
                      title=f"{rule}: {dataset}, batch {job_context.wildcards.get('batch', '')}")
    statuses = pd.Series([r["status"] for r in rows], dtype=object).value_counts()
    return {"units": len(rows), **{s: int(statuses.get(s, 0)) for s in (STATUS_DONE, STATUS_EXCLUDED)},
            "ran": len(pending), **counts}


def _read_needs(needs_manifest: Path | Sequence[Path] | None) -> dict[str, dict]:
    if needs_manifest is None:
        return {}
    paths = [needs_manifest] if isinstance(needs_manifest, (str, os.PathLike)) else list(needs_manifest)
    found = {}
    for path in paths:
        for row in read_manifest(Path(path)).to_dict(orient="records"):
            found[row["unit"]] = row
    return found


def _blocked_by(unit: Mapping[str, Any], needs: Mapping[str, dict]) -> dict[str, str] | None:
    key = unit.get("needs")
    if not key:
        return None
    row = needs.get(key)
    if row is None:
        return {"reason": f"needs unit {key}, which its batch did not list; rerun the anatomical batch",
                "file": ""}
    if row["status"] != STATUS_DONE:
        return {"reason": f"needs {key} ({row['rule']}), which was excluded: {row['reason']}", "file": row["file"]}
    return None


def _still_excluded(job: UnitJob, cache: HashCache) -> dict | None:
    from bh_models.core.exclusions import read_exclusion

    record = read_exclusion(results_dir=Path(job.results_dir), dataset=job.dataset, subject=job.unit["subject"],
                            rule=job.rule, unit=job.unit["key"])
    if record is None:
        return None
    inputs_sha, params_sha = unit_signature(inputs=job.inputs, params=job.params, cache=cache)
    if record.get("inputs_sha256") == inputs_sha and record.get("params_sha256") == params_sha:
        return record
    return None  # the data or the settings changed since: try again


# --------------------------------------------------------------------------- QC page


def _thumbnail(path: str) -> str | None:
    """A JPEG thumbnail of a figure as base64 (deterministic: fixed size and encoder settings)."""
    from PIL import Image

    if not path or not os.path.isfile(path):
        return None
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY, optimize=False, progressive=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_qc_page(*, rows: Sequence[Mapping[str, Any]], figures: Sequence[str], out_html: Path, title: str) -> None:
    """One self-contained HTML page for a batch: each unit's status, reason and figure thumbnails."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}section{margin-bottom:1.5em}"
             "img{max-width:48%;margin:2px;border:1px solid #ccc}.excluded{color:#a00}</style></head><body>",
             f"<h1>{esc(title)}</h1>"]
    counts = pd.Series([r["status"] for r in rows], dtype=object).value_counts().to_dict()
    parts.append(f"<p>{len(rows)} unit(s): " + ", ".join(f"{v} {esc(k)}" for k, v in sorted(counts.items()))
                 + ". Click a figure for its full size file in the results folder.</p>")
    for row in sorted(rows, key=lambda r: r["unit"]):
        parts.append(f'<section><h2 class="{esc(row["status"])}">{esc(row["unit"])}: {esc(row["status"])}</h2>')
        if row.get("reason"):
            parts.append(f"<p class=\"excluded\">{esc(row['reason'])}</p>")
        for name in figures:
            data = _thumbnail((row.get("outputs") or {}).get(name, ""))
            if data is not None:
                parts.append(f'<img alt="{esc(row["unit"])} {esc(name)}" src="data:image/jpeg;base64,{data}">')
        parts.append("</section>")
    parts += ["</body></html>", ""]
    atomic_write_text(Path(out_html), "\n".join(parts))
