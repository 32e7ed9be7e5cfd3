"""``bh audit RESULTS_DIR``: check every result against its provenance record.

Each file a job recorded as an output gets one status:

``ok``
    its sha256 equals the recorded one and its whole input chain is unchanged;
``modified``
    its own bytes changed since the job wrote it;
``stale``
    it is intact, but one of its inputs changed or vanished since (a raw BIDS
    file, or an upstream output), or an upstream output it was made from is
    itself modified, stale or missing, transitively;
``missing``
    it no longer exists.

Each file below the results directory that no record lists as an output is an
``orphan``. Covered: every file under ``RESULTS_DIR`` except hidden files and
folders (the hash cache, atomic-write temporaries) and the top-level folders of
:data:`IGNORED_TOP_LEVEL` (logs, provenance records, Snakemake metadata,
exclusion records, benchmark timings), and the audit's own TSV and HTML.

Speed: files whose stat stamp is unchanged since they were last hashed are not
read again (:class:`bh_models.core.hashing.HashCache`, shared with the provenance
records); ``--rehash`` reads every file. Hashing runs in threads.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bh_models.core.hashing import HashCache, hash_cache_dir
from bh_models.core.jsonio import atomic_write_text
from bh_models.core.provenance import iter_records, recorded_path_resolver, workdir_of

#: Statuses, from worst to best; also the order of the summary table.
STATUSES = ("missing", "modified", "stale", "orphan", "ok")

#: Top-level folders of a results directory that hold no derivatives.
IGNORED_TOP_LEVEL = frozenset({"logs", "provenance", ".snakemake", "exclusions", "benchmarks"})

COLUMNS = ["path", "status", "rule", "jobkey", "detail", "recorded_sha256", "current_sha256"]

#: Problem rows shown in the HTML (all rows are in the TSV).
HTML_MAX_ROWS = 5000


@dataclass
class _Job:
    rule: str
    jobkey: str
    inputs: list[tuple[str, str, str | None]]  # (absolute path, recorded path, recorded sha256)
    outputs: list[tuple[str, str, str | None]]
    finished: str
    problem: str | None = None  # why its outputs are stale; None when the chain is intact
    cause: str | None = None  # the first change up the chain (a raw input, a modified file)
    checked: bool = False


@dataclass
class _Chain:
    jobs: list[_Job] = field(default_factory=list)
    producer: dict[str, tuple[_Job, str | None]] = field(default_factory=dict)  # output -> job, recorded sha


def _abs(path: str | os.PathLike) -> str:
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def _load_chain(results_dir: Path, bids_roots: Mapping[str, Path] | None) -> _Chain:
    chain = _Chain()
    resolvers: dict[str, Callable[[str], str]] = {}  # records of one run share their context
    for _, record in iter_records(results_dir=results_dir):
        roots = dict(bids_roots) if bids_roots is not None else record.get("bids_roots", {})
        context = json.dumps([record.get("results_dir"), sorted((k, str(v)) for k, v in roots.items())])
        resolve = resolvers.get(context)
        if resolve is None:
            workdir = workdir_of(results_dir=results_dir, record=record)
            resolve = resolvers[context] = recorded_path_resolver(workdir=workdir, bids_roots=roots)

        def entries(kind: str) -> list[tuple[str, str, str | None]]:
            out = []
            for files in record.get(kind, {}).values():
                for entry in files:
                    try:
                        path = resolve(entry["path"])
                    except KeyError:  # BIDS URI of a dataset no longer configured: reads as missing
                        path = entry["path"]
                    out.append((path, entry["path"], entry.get("sha256")))
            return out

        job = _Job(
            rule=str(record.get("rule", "?")),
            jobkey=str(record.get("jobkey", "?")),
            inputs=entries("inputs"),
            outputs=entries("outputs"),
            finished=str(record.get("finished", "")),
        )
        chain.jobs.append(job)
        for path, _, digest in job.outputs:
            previous = chain.producer.get(path)
            # A file recorded twice (a rule renamed, a rerun under other wildcards): the latest record wins.
            if previous is None or job.finished >= previous[0].finished:
                chain.producer[path] = (job, digest)
    return chain


def _output_status(path: str, chain: _Chain, current: Mapping[str, str | None]) -> tuple[str, str]:
    job, recorded = chain.producer[path]
    if current.get(path) is None:
        return "missing", "file does not exist"
    if current[path] != recorded:
        return "modified", "sha256 differs from the provenance record"
    problem = _job_problem(job, chain, current)
    return ("stale", problem) if problem else ("ok", "")


def _job_problem(job: _Job, chain: _Chain, current: Mapping[str, str | None]) -> str | None:
    """Why a job's outputs no longer follow from its inputs (memoised, cycle-safe)."""
    if job.checked:
        return job.problem
    job.checked = True  # set first: a cyclic record chain terminates as "intact"
    for path, shown, recorded in job.inputs:
        now = current.get(path)
        if now is None:
            job.problem = job.cause = f"input missing: {shown}"
        elif now != recorded:
            job.problem = job.cause = f"input changed: {shown}"
        elif path in chain.producer:
            upstream, upstream_recorded = chain.producer[path]
            if upstream_recorded != now:
                job.problem = job.cause = f"input {shown} differs from its own provenance record"
            elif _job_problem(upstream, chain, current):
                job.cause = upstream.cause
                job.problem = f"upstream {shown} is stale; cause: {job.cause}"
        if job.problem:
            break
    return job.problem


def _walk_covered(results_dir: str, *, recorded: Collection[str], skip: Collection[str]) -> list[str]:
    """Files under the results dir that need a record, minus the ``recorded`` ones."""
    found = []
    for dirpath, dirnames, filenames in os.walk(results_dir):
        top = dirpath == results_dir
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".")
            and not (top and d in IGNORED_TOP_LEVEL)
            and os.path.join(dirpath, d) not in recorded  # a folder output is recorded as a whole
        )
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if not name.startswith(".") and path not in recorded and path not in skip:
                found.append(path)
    return found


def _display(path: str, results_dir: str) -> str:
    prefix = results_dir.rstrip(os.sep) + os.sep
    return path[len(prefix) :].replace(os.sep, "/") if path.startswith(prefix) else path


def audit(
    results_dir: Path,
    *,
    out_tsv: Path | None = None,
    out_html: Path | None = None,
    rehash: bool = False,
    threads: int | None = None,
    bids_roots: Mapping[str, Path] | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Audit a results directory against its provenance records.

    Parameters
    ----------
    results_dir : Path
        Results directory of a run (holding ``provenance/`` and the derivatives).
    out_tsv, out_html : Path, optional
        Where to write the full table (TSV) and a human-readable report (HTML).
    rehash : bool
        Read every file again instead of trusting hash-cache entries whose stat
        stamp is unchanged.
    threads : int, optional
        Hashing threads. Default: 1 when the cache is trusted (cache hits are
        Python-bound, extra threads only contend for the GIL), ``min(4, cpu
        count)`` with ``rehash`` (reads release the GIL).
    bids_roots : mapping, optional
        Raw dataset name -> BIDS root, overriding the roots stored in the
        records (for raw data that moved since the run).
    progress : bool
        Show a progress bar while hashing.

    Returns
    -------
    pandas.DataFrame
        One row per recorded output and per orphan, sorted by path, with
        columns :data:`COLUMNS`; ``path`` is relative to ``results_dir``.
    """
    root = _abs(results_dir)
    chain = _load_chain(Path(root), bids_roots)
    # The audit's own files are being rewritten: an earlier audit job's record of them
    # (left by a previous invocation, whose outputs Snakemake removed before this rerun)
    # describes nothing that exists yet.
    writing = {_abs(p) for p in (out_tsv, out_html) if p is not None}
    chain.producer = {path: entry for path, entry in chain.producer.items() if path not in writing}
    to_hash = set(chain.producer)
    for job in chain.jobs:
        to_hash.update(path for path, _, _ in job.inputs)
    cache = HashCache(cache_dir=hash_cache_dir(results_dir=Path(root)), rehash=rehash)
    if threads is None:
        threads = min(4, os.cpu_count() or 1) if rehash else 1
    current = cache.sha256_many(paths=sorted(to_hash), threads=threads, progress=progress)

    rows: list[dict[str, Any]] = []
    for path in sorted(chain.producer):
        job, recorded = chain.producer[path]
        status, detail = _output_status(path, chain, current)
        rows.append(
            {
                "path": _display(path, root),
                "status": status,
                "rule": job.rule,
                "jobkey": job.jobkey,
                "detail": detail,
                "recorded_sha256": recorded or "",
                "current_sha256": current.get(path) or "",
            }
        )
    own_reports = {_abs(p) for p in (out_tsv, out_html) if p is not None}
    for path in _walk_covered(root, recorded=chain.producer.keys(), skip=own_reports):
        rows.append(
            {
                "path": _display(path, root),
                "status": "orphan",
                "rule": "",
                "jobkey": "",
                "detail": "no provenance record lists this file",
                "recorded_sha256": "",
                "current_sha256": "",
            }
        )
    table = pd.DataFrame(rows, columns=COLUMNS).sort_values(["path", "rule"], kind="stable").reset_index(drop=True)
    if out_tsv is not None:
        atomic_write_text(Path(out_tsv), table.to_csv(sep="\t", index=False))
    if out_html is not None:
        write_audit_html(table=table, out_html=Path(out_html), results_dir=Path(results_dir))
    return table


def summarize(*, table: pd.DataFrame) -> pd.DataFrame:
    """Counts of each status per rule, with a total row and column.

    Parameters
    ----------
    table : pandas.DataFrame
        Output of :func:`audit`.

    Returns
    -------
    pandas.DataFrame
        Index: rule (orphans under ``(none)``) then ``total``; columns: the
        statuses of :data:`STATUSES` then ``total``.
    """
    rules = table["rule"].where(table["rule"] != "", "(none)")
    counts = pd.crosstab(rules, table["status"]).reindex(columns=list(STATUSES), fill_value=0)
    counts.loc["total"] = counts.sum(axis=0)
    counts["total"] = counts.sum(axis=1)
    counts.index.name = "rule"
    counts.columns.name = None
    return counts.astype(int)


def problems(*, table: pd.DataFrame) -> pd.DataFrame:
    """Rows whose status is not ``ok``, worst status first, then by path."""
    order = {status: rank for rank, status in enumerate(STATUSES)}
    bad = table[table["status"] != "ok"]
    return bad.sort_values(["status", "path"], key=lambda col: col.map(order) if col.name == "status" else col)


_CSS = """
body{font-family:sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
.missing{background:#f8d0d0}.modified{background:#fbe3c8}.stale{background:#fff3bf}
.orphan{background:#e0e7ff}.ok{background:#dff3df}
"""


def write_audit_html(*, table: pd.DataFrame, out_html: Path, results_dir: Path) -> Path:
    """Write the audit as one self-contained HTML page (no scripts, no links).

    Parameters
    ----------
    table : pandas.DataFrame
        Output of :func:`audit`.
    out_html : Path
        File to write.
    results_dir : Path
        Shown in the title, as given by the user.

    Returns
    -------
    Path
        ``out_html``.
    """
    summary = summarize(table=table)
    bad = problems(table=table)
    shown = bad.head(HTML_MAX_ROWS)
    body_rows = "\n".join(
        f'<tr class="{html.escape(row.status)}">'
        + "".join(f"<td>{html.escape(str(getattr(row, col)))}</td>" for col in ("path", "status", "rule", "detail"))
        + "</tr>"
        for row in shown.itertuples(index=False)
    )
    verdict = "All recorded results are intact." if bad.empty else f"{len(bad)} file(s) need attention."
    more = (
        f"<p>Showing the first {HTML_MAX_ROWS} of {len(bad)} problems; the TSV lists all.</p>"
        if len(bad) > HTML_MAX_ROWS
        else ""
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>bh audit: {html.escape(str(results_dir))}</title>
<style>{_CSS}</style></head><body>
<h1>Provenance audit of {html.escape(str(results_dir))}</h1>
<p>{html.escape(verdict)} {len(table)} file(s) checked. Statuses: ok (intact), modified (its own bytes changed),
stale (an input changed or vanished since it was made, possibly upstream), missing (deleted),
orphan (no provenance record).</p>
<h2>Summary</h2>
{summary.to_html(border=0)}
<h2>Problems</h2>
{more}
<table><thead><tr><th>path</th><th>status</th><th>rule</th><th>detail</th></tr></thead>
<tbody>
{body_rows}
</tbody></table>
</body></html>
"""
    atomic_write_text(out_html, page)
    return out_html


def write_audit(
    *, results_dir: Path, out_tsv: Path, out_html: Path, rehash: bool = False, threads: int = 1
) -> dict[str, int]:
    """Step-function form of :func:`audit` for a Snakemake rule.

    Parameters
    ----------
    results_dir : Path
        Results directory to audit.
    out_tsv, out_html : Path
        Audit table and page to write.
    rehash : bool
        Read every file again.
    threads : int
        Hashing threads.

    Returns
    -------
    dict
        Count of files per status.
    """
    table = audit(results_dir, out_tsv=out_tsv, out_html=out_html, rehash=rehash, threads=threads)
    counts = table["status"].value_counts()
    return {status: int(counts.get(status, 0)) for status in STATUSES}


def _parse_root(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``bh audit RESULTS_DIR [--rehash] [--out-tsv F] [--out-html F]``.

    Prints the summary and the problem files, writes the TSV and HTML
    (default ``RESULTS_DIR/logs/audit/audit.{tsv,html}``, a folder the
    audit itself ignores), and returns 0 when every file is ``ok``, 1 when any
    is missing, modified, stale or orphan, 2 on a usage error.
    """
    parser = argparse.ArgumentParser(prog="bh audit", description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path, help="results directory of a run")
    parser.add_argument("--out-tsv", type=Path, help="audit table (default RESULTS_DIR/logs/audit/audit.tsv)")
    parser.add_argument("--out-html", type=Path, help="audit page (default RESULTS_DIR/logs/audit/audit.html)")
    parser.add_argument("--rehash", action="store_true", help="read every file again, ignoring the hash cache")
    parser.add_argument(
        "--threads", type=int, default=None, help="hashing threads (default 1, or min(4, cores) with --rehash)"
    )
    parser.add_argument(
        "--bids-root",
        type=_parse_root,
        action="append",
        metavar="NAME=PATH",
        help="where raw dataset NAME lives now (overrides the recorded roots; repeatable)",
    )
    parser.add_argument("--max-problems", type=int, default=50, help="problem rows to print (default 50)")
    args = parser.parse_args(argv)
    if not args.results_dir.is_dir():
        print(f"bh audit: {args.results_dir} is not a directory. Fix: pass the run's results folder.", file=sys.stderr)
        return 2
    out_dir = args.results_dir / "logs" / "audit"
    table = audit(
        args.results_dir,
        out_tsv=args.out_tsv or out_dir / "audit.tsv",
        out_html=args.out_html or out_dir / "audit.html",
        rehash=args.rehash,
        threads=args.threads,
        bids_roots=dict(args.bids_root) if args.bids_root else None,
        progress=True,
    )
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 120):
        print(summarize(table=table).to_string())
        bad = problems(table=table)
        if not bad.empty:
            print()
            print(bad[["status", "path", "detail"]].head(args.max_problems).to_string(index=False))
            if len(bad) > args.max_problems:
                print(f"... and {len(bad) - args.max_problems} more, see {args.out_tsv or out_dir / 'audit.tsv'}")
    if table.empty:
        print("bh audit: no provenance records and no files found.", file=sys.stderr)
    return 0 if bad.empty else 1


if __name__ == "__main__":
    sys.exit(main())
